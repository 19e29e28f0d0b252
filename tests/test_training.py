"Training (chapter 7) and the CLI: schedule, weight decay groups, exact resume, DDP equivalence, run folders, bad options, the demo."
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file

from vitsd_nbdev import __version__
from vitsd_nbdev.cli import demo, train_parser
from vitsd_nbdev.fastdata import get_device_loaders
from vitsd_nbdev.training import TrainConfig, evaluate, load_checkpoint, lr_at, param_groups, save_checkpoint, train
from vitsd_nbdev.vit import create_model

BIN = Path(sys.executable).parent
TINY = dict(dataset="digits", image_size=16, preset="tiny", batch_size=64)


def test_schedule_matches_its_formula():
    T, W, lr, lo = 1000, 100, 1e-3, 1e-6
    for t in range(0, T + 1, 7):
        expected = lo + (lr - lo) * t / W if t < W else lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * (t - W) / (T - W)))
        assert lr_at(t, T, W, lr, lo) == pytest.approx(expected, rel=1e-12)
    lrs = [lr_at(t, T, W, lr, lo) for t in range(T)]
    assert max(lrs) == pytest.approx(lr) and all(a <= b for a, b in zip(lrs[:W], lrs[1:W + 1]))


def test_weight_decay_groups_follow_the_official_code_for_lsa():
    m = create_model("sl_vit", image_size=16, preset="tiny")
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd, d = {names[id(p)] for p in no_decay["params"]}, {names[id(p)] for p in decay["params"]}
    assert {"embed.pos_embed", "embed.cls_token", "blocks.0.norm1.weight", "head.bias"} <= nd
    assert {"blocks.0.attn.temperature.scale", "blocks.1.attn.temperature.scale"} <= d   # official: s is decayed
    assert all(p.ndim == 2 or n.endswith("temperature.scale") for n, p in m.named_parameters() if n in d)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0
    direct = create_model("sl_vit", image_size=16, preset="tiny", temperature_form="direct")
    nd = {n for n, p in direct.named_parameters() if any(p is q for q in param_groups(direct, 0.05)[1]["params"])}
    assert "blocks.0.attn.temperature.tau" in nd                                          # a stored τ is not

    m_nd = {id(p) for p in param_groups(m, 0.05, decay_temperature=False)[1]["params"]}
    assert id(m.blocks[0].attn.temperature.scale) in m_nd                                # the switch


def test_decay_temperature_reaches_the_optimizer(tmp_path):
    groups = {}
    for decay in (True, False):
        cfg = TrainConfig(**TINY, model="vit_temp", epochs=1, warmup_epochs=0, decay_temperature=decay,
                          out_dir=str(tmp_path / str(decay)))
        train(cfg, progress=False, log=False)
        opt = load_checkpoint(tmp_path / str(decay) / "checkpoint.pt")["optimizer"]
        groups[decay] = {g["weight_decay"]: len(g["params"]) for g in opt["param_groups"]}
    depth = create_model("vit_temp", image_size=16, preset="tiny").config.depth
    assert groups[False][0.0] == groups[True][0.0] + depth                  # one s per block moved
    assert groups[False][0.05] == groups[True][0.05] - depth


def test_a_checkpoint_without_a_newer_option_resumes_with_its_default(tmp_path):
    cfg = TrainConfig(**TINY, model="vit", epochs=2, warmup_epochs=0, out_dir=str(tmp_path))
    train(cfg, stop_after=1, progress=False, log=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    del ckpt["config"]["decay_temperature"]                    # as written before the option existed
    save_checkpoint(tmp_path / "checkpoint.pt", ckpt)
    assert train(cfg, resume=True, progress=False, log=False)["epochs_done"] == 2


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = lambda d: TrainConfig(**TINY, model="sl_vit", epochs=3, warmup_epochs=1, drop_path=0.1, out_dir=str(tmp_path / d))
    train(cfg("whole"), progress=False, log=False)
    train(cfg("part"), stop_after=1, progress=False, log=False)
    train(cfg("part"), resume=True, progress=False, log=False)
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt"), load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert a["history"] == [dict(h, epoch_time=a["history"][i]["epoch_time"], img_per_s=a["history"][i]["img_per_s"]) for i, h in enumerate(b["history"])]
    for k in a["model"]: assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items(): assert torch.equal(v["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"epoch": 1})
    def crash(*a, **k): raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(p, {"epoch": 2})
    assert load_checkpoint(p)["epoch"] == 1                   # the old checkpoint survives a failed write


def _weights(d):
    return load_checkpoint(Path(d) / "checkpoint.pt")["model"]


def test_two_process_gloo_ddp_equals_one_process(tmp_path):
    args = ["--dataset", "digits", "--image-size", "16", "--preset", "tiny", "--model", "sl_vit", "--epochs", "2", "--warmup-epochs", "1",
            "--batch-size", "64", "--no-augment", "--drop-path", "0", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([BIN / "vitsd-train", *args, "--out-dir", tmp_path / "one"], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", "29517", "--no-python", BIN / "vitsd-train", *args,
                          "--out-dir", tmp_path / "two"], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 x cpu" in two.stdout
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("args,message", [
    (["--dataset", "mnist"], "unknown dataset"),
    (["--dataset", "digits", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["--dataset", "imagefolder:/no/such/folder", "--model", "resnet"], "invalid choice: 'resnet'"),  # before the data
    (["--dataset", "digits", "--image-size", "32", "--patch-size", "5"], "pass a --patch-size that divides"),
    (["--dataset", "imagefolder:/no/such/folder"], "no folder"),
    (["--dataset", "digits", "--amp", "fp8"], "invalid choice: 'fp8'"),
    (["--dataset", "digits", "--val-split", "1.5"], "--val-split must be"),
    (["--dataset", "digits", "--warmup-epochs", "3"], "--warmup-epochs must be between 0 and epochs"),
])
def test_cli_rejects_bad_options_in_one_line(tmp_path, args, message):
    r = subprocess.run([BIN / "vitsd-train", *args, "--epochs", "1", "--no-progress", "--out-dir", tmp_path],
                       capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("vitsd-train: error:"), r.stderr


def test_cli_help_describes_every_option_and_shows_defaults():
    ap = train_parser()
    for a in ap._actions: assert a.help, a.dest
    text = " ".join(ap.format_help().split())                   # unwrapped
    assert "(default: 128)" in text and "--val-split" in text and "(default: sl_vit)" in text
    r = subprocess.run([BIN / "vitsd-train", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout


def test_one_epoch_works_without_warmup_flags(tmp_path, run_folder_check):
    r = subprocess.run([BIN / "vitsd-train", "--dataset", "digits", "--image-size", "16", "--preset", "tiny",
                        "--epochs", "1", "--no-progress", "--out-dir", tmp_path], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert run_folder_check(tmp_path)["summary"]["epochs_done"] == 1


def test_run_folder_rebuilds_the_trained_model(tmp_path):
    "config.json + model.safetensors rebuild the module train() trained in place; the checkpoint loads with weights_only."
    torch.manual_seed(0)
    mine = create_model("sl_vit", image_size=16, preset="tiny", in_chans=1)
    seen = []
    cfg = TrainConfig(**TINY, epochs=2, out_dir=str(tmp_path))
    s = train(cfg, model=mine, progress=False, log=False, on_epoch_end=seen.append)
    assert [h["epoch"] for h in seen] == [1, 2] and s["model"] == "ViT"
    run = json.loads((tmp_path / "config.json").read_text())
    assert run["classes"] == [str(k) for k in range(10)] and run["mean"] == [0.3054] and run["in_chans"] == 1
    assert run["model"] == {"class": "vitsd_nbdev.vit.ViT"} and run["train"]["epochs"] == 2
    assert set(run["versions"]) == {"vitsd_nbdev", "torch"}
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)          # no pickled objects inside
    rebuilt = create_model("sl_vit", image_size=16, preset="tiny", in_chans=1)
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x = torch.randn(4, 1, 16, 16)
    mine.eval(), rebuilt.eval()
    assert torch.equal(mine(x), rebuilt(x))
    for k, v in ckpt["model"].items(): assert torch.equal(v, rebuilt.state_dict()[k]), k


def test_val_split_too_small_names_val_split(tmp_path):
    cfg = TrainConfig(**TINY, epochs=1, val_split=0.001, out_dir=str(tmp_path))
    message = r"val_split 0.001: .*at least the number of classes, 10; raise it"
    with pytest.raises(ValueError, match=message):
        train(cfg, progress=False, log=False)


def test_val_split_chooses_the_best_epoch_on_validation(tmp_path):
    cfg = TrainConfig(**TINY, epochs=6, val_split=0.1, out_dir=str(tmp_path))
    s = train(cfg, progress=False, log=False)
    hist = json.loads((tmp_path / "metrics.json").read_text())["history"]
    best = max(hist, key=lambda h: h["val_acc"])
    assert (s["best_on"], s["best_epoch"], s["best_acc"], s["best_val_acc"]) == \
        ("validation", best["epoch"], best["test_acc"], best["val_acc"])
    run = json.loads((tmp_path / "config.json").read_text())
    m = create_model(**run["model"])
    m.load_state_dict(load_file(tmp_path / "best.safetensors"))              # the best epoch's weights:
    _, test_dl, _ = get_device_loaders("digits", image_size=16, batch_size=64)
    assert round(evaluate(m, test_dl, torch.device("cpu"))[1], 5) == best["test_acc"]   # its test accuracy
    plain = train(TrainConfig(**TINY, epochs=1, out_dir=str(tmp_path / "plain")), progress=False, log=False)
    assert plain["best_on"] == "test" and plain["best_val_acc"] is None


def test_best_weights_are_those_of_the_best_validation_epoch(tmp_path, monkeypatch):
    "With scripted accuracies, validation picks epoch 2 while test would pick epoch 3; best.safetensors is epoch 2's."
    import vitsd_nbdev.training as training
    scripted = iter([(1.0, 0.5), (1.0, 0.5), (1.0, 0.9), (1.0, 0.6), (1.0, 0.6), (1.0, 0.9)])   # (val, test) per epoch
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: next(scripted))
    mine = create_model("vit", image_size=16, preset="tiny", in_chans=1)
    snapshots = {}
    def snapshot(m): snapshots[m["epoch"]] = {k: v.clone() for k, v in mine.state_dict().items()}
    s = train(TrainConfig(**TINY, epochs=3, val_split=0.1, out_dir=str(tmp_path)), model=mine, progress=False,
              log=False, on_epoch_end=snapshot)
    assert (s["best_epoch"], s["best_val_acc"], s["best_acc"], s["final_acc"]) == (2, 0.9, 0.6, 0.9)
    best = load_file(tmp_path / "best.safetensors")
    for k, v in snapshots[2].items(): assert torch.equal(best[k], v), k
    assert any(not torch.equal(best[k], v) for k, v in snapshots[3].items())

def test_val_split_with_eval_every_chooses_among_evaluated_epochs(tmp_path, run_folder_check):
    cfg = TrainConfig(**TINY, epochs=3, eval_every=2, val_split=0.1, out_dir=str(tmp_path))
    s = train(cfg, progress=False, log=False)
    hist = run_folder_check(tmp_path)["history"]          # best.safetensors: the best val epoch's
    assert [h["val_acc"] is None for h in hist] == [True, False, False]   # epochs 2 and 3 (last)
    assert s["best_epoch"] in (2, 3)

def test_demo_reaches_a_sane_accuracy(tmp_path, capsys, run_folder_check):
    # the main job's recipe, shortened: after 10 epochs both models are far above the 10% of chance
    res = demo(tmp_path, epochs=10, progress=False)
    assert "seed 0, on cpu" in capsys.readouterr().out          # it names the device it ran on
    assert [r["model"] for r in res] == ["vit", "sl_vit"]
    assert all(r["final_acc"] >= 0.7 for r in res), res
    for r in res: assert run_folder_check(r["out_dir"])["summary"] == r   # weights give its numbers

def test_compiled_training_matches_eager_on_cpu(tmp_path):
    "torch.compile (TrainConfig.compile) works on the CPU and trains the same model as eager mode, to rounding."
    runs = {}
    for compiled in (False, True):
        cfg = TrainConfig(dataset="digits", image_size=16, preset="tiny", model="sl_vit", epochs=1, warmup_epochs=0,
                          batch_size=64, compile=compiled, out_dir=str(tmp_path / str(compiled)))
        train(cfg, progress=False, log=False)
        runs[compiled] = load_checkpoint(tmp_path / str(compiled) / "checkpoint.pt")
    eager, comp = runs[False]["history"][0], runs[True]["history"][0]
    assert math.isclose(eager["train_loss"], comp["train_loss"], rel_tol=1e-3)
    assert abs(eager["test_acc"] - comp["test_acc"]) <= 2 / 360
    for k, v in runs[False]["model"].items():
        torch.testing.assert_close(runs[True]["model"][k], v, rtol=1e-3, atol=1e-4)


def test_bf16_config_for_a_gpu_is_accepted_on_a_cpu_without_bf16(monkeypatch):
    # a config is data: whether this CPU has bf16 matters only when training starts on the CPU
    import vitsd_nbdev.training as tr
    monkeypatch.setattr(tr, "cpu_has_bf16", lambda: False)
    assert TrainConfig(amp="bf16", device="cuda").amp == "bf16"
    with pytest.raises(ValueError, match="bf16"):
        tr.amp_dtype(torch.device("cpu"), "bf16")


TRAIN_2_EPOCHS = ["--dataset", "digits", "--image-size", "16", "--preset", "tiny", "--epochs", "2",
                  "--batch-size", "64"]


def test_a_training_log_written_to_a_file_has_no_carriage_returns(tmp_path):
    "`vitsd-train ... > log 2>&1`: no progress-bar frames, one plain line per epoch (issue: CI and nohup logs)."
    log = tmp_path / "log"
    with open(log, "w") as f:
        r = subprocess.run([str(BIN / "vitsd-train"), *TRAIN_2_EPOCHS, "--out-dir", str(tmp_path / "run")],
                           stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text, "a progress-bar frame reached a file: " + repr(text[:300])
    assert [line.split("/")[0] for line in text.splitlines() if line.startswith("epoch ")] == ["epoch   1",
                                                                                              "epoch   2"]


def test_progress_bars_are_drawn_on_a_terminal(tmp_path):
    "On a (pseudo-)terminal the bars are there: a carriage return that does not end a line redraws one."
    import fcntl
    import pty
    import re
    import struct
    import termios
    import threading
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))   # 80 columns (tqdm needs some)
    proc = subprocess.Popen([str(BIN / "vitsd-train"), *TRAIN_2_EPOCHS, "--out-dir", str(tmp_path / "run")],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    def read():                      # drain the terminal, so the child never blocks on a full buffer
        while True:
            try: data = os.read(master, 4096)
            except OSError: return   # EIO: the child has closed the terminal
            if not data: return
            chunks.append(data)
    reader = threading.Thread(target=read)
    reader.start()
    assert proc.wait(timeout=600) == 0
    reader.join(timeout=30)
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert re.search(r"\r(?!\n)", out), "no progress-bar frame on a terminal: " + repr(out[-300:])
