"Using a trained model (chapter 12): vitsd-train on a folder, vitsd-predict; loaded logits; ONNX."
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitsd_nbdev.predict import Predictor, export_onnx, load_run, predict, preprocess
from vitsd_nbdev.training import TrainConfig, train
from vitsd_nbdev.vit import create_model

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _command(name):
    "The installed console script, or its entry point run by this Python (older editable install)."
    if (BIN / name).exists(): return [str(BIN / name)]
    module, func = {"vitsd-train": ("cli", "train_main"),
                    "vitsd-predict": ("predict", "predict_main")}[name]
    return [sys.executable, "-c", f"from vitsd_nbdev.{module} import {func}; {func}()"]


def _folder(root: Path, n=12, seed=0):
    "Three classes of noisy single-colour images of different sizes."
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            size = int(rng.integers(20, 40))
            a = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / name / f"{i}.png")


def test_train_on_a_folder_then_predict_its_images(tmp_path, run_folder_check):
    _folder(tmp_path / "data")
    r = subprocess.run([*_command("vitsd-train"), "--dataset", f"imagefolder:{tmp_path / 'data'}",
                        "--image-size", "16", "--model", "sl_vit", "--preset", "tiny",
                        "--epochs", "8", "--batch-size", "8", "--no-progress",
                        "--out-dir", tmp_path / "run"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    run_folder_check(tmp_path / "run")            # the weights give the accuracies it reports
    images = [str(tmp_path / "data" / c / f"{i}.png") for c in COLOURS for i in range(3)]
    r = subprocess.run([*_command("vitsd-predict"), tmp_path / "run", *images, "--topk", "2",
                        "--json"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["image"] for o in out] == images
    predicted = [o["predictions"][0]["class"] for o in out]
    # the folder's class names
    assert predicted == [Path(f).parent.name for f in images], predicted
    r = subprocess.run([*_command("vitsd-predict"), tmp_path / "run", images[0]],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout.startswith(f"{images[0]}: red "), r.stdout


def test_loaded_model_gives_the_trained_models_logits(tmp_path):
    torch.manual_seed(0)
    mine = create_model("vit", image_size=16, preset="tiny", in_chans=1)
    train(TrainConfig(dataset="digits", image_size=16, preset="tiny", batch_size=64, epochs=2,
                      out_dir=str(tmp_path)),
          model=mine, progress=False, log=False)
    with pytest.raises(ValueError, match="pass model="):
        load_run(tmp_path)
    p = load_run(tmp_path, model=create_model("vit", image_size=16, preset="tiny", in_chans=1))
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(p.model(preprocess(p, list(x))), mine.eval()(preprocess(p, list(x))))


@pytest.mark.parametrize("name", ["vit", "sl_vit"])
def test_onnx_export_matches_pytorch(tmp_path, name):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    p = Predictor(create_model(name, num_classes=3, image_size=16, preset="tiny").eval(),
                  ["a", "b", "c"], 16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), {})
    images = [torch.randint(0, 256, (3, s, s), dtype=torch.uint8) for s in (16, 16, 16, 16, 16)]
    session = ort.InferenceSession(str(export_onnx(p, tmp_path / "m.onnx")))
    got = torch.from_numpy(session.run(None, {"images": torch.stack(images).numpy()})[0])
    with torch.no_grad(): want = p.model(preprocess(p, images))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)     # float32 rounding only
    assert [r[0][0] for r in predict(p, images)] == [p.classes[k] for k in got.argmax(1).tolist()]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    "A run folder of one epoch of a tiny SL-ViT on the digits at 16x16, and a digit as a PNG file."
    root = tmp_path_factory.mktemp("digits_run")
    train(TrainConfig(dataset="digits", image_size=16, preset="tiny", batch_size=64, epochs=1,
                      out_dir=str(root / "run")), progress=False, log=False)
    digit = np.full((8, 8), 128, np.uint8)
    Image.fromarray(digit).save(root / "one.png")
    return root / "run", root / "one.png"


def test_closed_pipe_ends_quietly(digits_run):
    "`vitsd-predict RUN IMAGE... | head -1`: the reader closes the pipe after one line."
    run, image = digits_run
    proc = subprocess.Popen([*_command("vitsd-predict"), run, *[image] * 2000, "--topk", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    first = proc.stdout.readline()
    proc.stdout.close()                              # as `head -1` does once it has its line
    err = proc.stderr.read()
    status = proc.wait(timeout=300)
    assert first.startswith(f"{image}: ".encode()), first
    assert len(first) * 2000 > 2 * 65536             # more than a pipe holds: the writer must block
    assert err == b"" and status in (0, 141), (status, err.decode()[-500:])


def test_prediction_imports_no_torchvision(digits_run, tmp_path):
    "`vitsd-predict RUN IMAGE` at the model's size loads torch only: torchvision's import (~1 s) is cut."
    run, _ = digits_run
    image = tmp_path / "sixteen.png"
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(image)
    code = ("import sys\nfrom vitsd_nbdev.cli import predict_main\n"
            f"predict_main([{str(run)!r}, {str(image)!r}])\n"
            "print('TORCHVISION', 'torchvision' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-500:]
    assert f"{image}: " in r.stdout                                  # it did predict
    assert r.stdout.rstrip().endswith("TORCHVISION False"), (
        "predicting imported torchvision: a module on the prediction path imports it at module "
        "level; import it inside the function that needs it")
