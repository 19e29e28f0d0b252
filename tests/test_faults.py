"""Run folders, faults and numerics: occupied and locked folders, resume by contents, extension,
non-finite losses, option checks, a full disk, read-only folders, damaged checkpoints, DDP, and
kill-then-resume."""
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import vitsd_nbdev.training as training
from vitsd_nbdev.cli import demo, train_main
from vitsd_nbdev.training import (TrainConfig, load_checkpoint, lr_at, save_checkpoint, train,
                                  write_atomic)
from vitsd_nbdev.vit import create_model

BIN = Path(sys.executable).parent
TINY = dict(dataset="digits", image_size=16, preset="tiny", batch_size=64)
FLAGS = ["--dataset", "digits", "--image-size", "16", "--preset", "tiny", "--batch-size", "64",
         "--no-progress"]


def cli(capsys, *argv):
    "Exit status, stdout and stderr of `vitsd-train argv`, run in this process."
    try:
        train_main([*FLAGS, *map(str, argv)])
        code = 0
    except SystemExit as e: code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitsd-train: error:"), err
    return lines[0]


def strict_json(path):
    def refuse(c): raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


# run folders: occupied, locked, stale

def test_a_new_run_into_a_finished_run_is_refused(tmp_path, capsys):
    assert cli(capsys, "--epochs", "1", "--out-dir", tmp_path)[0] == 0
    before = (tmp_path / "metrics.json").read_bytes()
    code, _, err = cli(capsys, "--epochs", "1", "--seed", "1", "--out-dir", tmp_path)
    line = one_line(err)
    assert code == 2 and "already holds a finished run, 1 of 1 epochs" in line
    assert "--resume" in line and "--overwrite" in line
    assert (tmp_path / "metrics.json").read_bytes() == before                  # nothing replaced
    code, _, _ = cli(capsys, "--epochs", "1", "--seed", "1", "--out-dir", tmp_path, "--overwrite")
    assert code == 0 and strict_json(tmp_path / "metrics.json")["config"]["seed"] == 1


def test_a_running_run_is_refused_and_a_stale_lock_is_reported(tmp_path, capsys):
    sleeper = subprocess.Popen(["sleep", "60"])
    lock = tmp_path / "train.lock"
    lock.write_text(json.dumps(dict(pid=sleeper.pid, host=socket.gethostname())))
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):               # never beside a live run
            code, _, err = cli(capsys, "--epochs", "1", "--out-dir", tmp_path, *extra)
            line = one_line(err)
            assert code == 2 and f"in use by a training still running (pid {sleeper.pid}" in line
    finally:
        sleeper.kill()
        sleeper.wait()
    code, _, err = cli(capsys, "--epochs", "1", "--out-dir", tmp_path)       # the holder has died
    line = one_line(err)
    assert code == 2 and f"pid {sleeper.pid}" in line and "no longer running" in line
    assert "--overwrite" in line
    seen = []
    def read_lock(m): seen.append(json.loads(lock.read_text()))
    s = train(TrainConfig(**TINY, epochs=1, out_dir=str(tmp_path)), overwrite=True, progress=False,
              log=False, on_epoch_end=read_lock)
    assert "taking over" in capsys.readouterr().err and s["epochs_done"] == 1
    assert (seen[0]["pid"], seen[0]["host"]) == (os.getpid(), socket.gethostname())  # this process
    assert not lock.exists()                                                   # removed at the end


# resume: by contents, finished runs, extension

def test_a_moved_run_folder_resumes(tmp_path, monkeypatch):
    cfg = TrainConfig(**TINY, epochs=2, out_dir=str(tmp_path / "a"))
    train(cfg, stop_after=1, progress=False, log=False)
    (tmp_path / "a").rename(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    s = train(TrainConfig(**TINY, epochs=2, out_dir="b/"), resume=True, progress=False, log=False)
    assert s["epochs_done"] == 2
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2


def test_a_finished_run_says_so_and_extends_only_when_asked(tmp_path, capsys):
    cfg = TrainConfig(**TINY, epochs=2, warmup_epochs=1, out_dir=str(tmp_path))
    train(cfg, progress=False, log=False)
    s = train(cfg, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "finished (2 of 2 epochs)" in out and "epochs 3-2" not in out and s["epochs_done"] == 2
    code, _, err = cli(capsys, "--epochs", "3", "--warmup-epochs", "1", "--out-dir", tmp_path,
                       "--resume")
    assert code == 2 and "planned for 2 epochs, not 3" in one_line(err) and "--extend" in err
    longer = TrainConfig(**TINY, epochs=3, warmup_epochs=1, out_dir=str(tmp_path))
    s = train(longer, resume=True, extend=True, progress=False, log=False)
    hist = strict_json(tmp_path / "metrics.json")["history"]
    steps = 1437 // 64
    assert s["epochs_done"] == 3 and [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[1]["lr"] == lr_at(2 * steps - 1, 2 * steps, steps, 1e-3, 1e-6)   # the old schedule
    assert hist[2]["lr"] == lr_at(3 * steps - 1, 3 * steps, steps, 1e-3, 1e-6)   # the new one
    with pytest.raises(ValueError, match="at least 1"):
        train(longer, resume=True, stop_after=0)
    code, _, err = cli(capsys, "--epochs", "3", "--out-dir", tmp_path / "new", "--stop-after", "0")
    assert code == 2 and "--stop-after must be at least 1" in one_line(err)
    assert not (tmp_path / "new").exists()


def test_the_demo_refuses_a_folder_with_its_runs_before_training(tmp_path):
    (tmp_path / "sl_vit").mkdir()
    (tmp_path / "sl_vit" / "checkpoint.pt").write_bytes(b"")       # even a second model's folder
    with pytest.raises(ValueError, match="already holds the demo's runs.*overwrite=True"):
        demo(tmp_path, epochs=1, progress=False)
    assert not (tmp_path / "vit").exists()                          # nothing trained


# numerics and options

class NaNAfter(torch.nn.Module):
    "A model whose output becomes NaN from its `n`-th training call on."
    def __init__(self, n):
        super().__init__()
        self.inner = create_model("vit", image_size=16, preset="tiny", in_chans=1)
        self.n, self.calls = n, 0
    def forward(self, x):
        if self.training: self.calls += 1
        y = self.inner(x)
        return y * float("nan") if self.training and self.calls >= self.n else y


def test_training_stops_on_a_non_finite_loss(tmp_path):
    steps = 1437 // 64
    cfg = TrainConfig(**TINY, epochs=3, out_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"epoch 2 of 3, at step 5 of 22.*lr=0.0001"):
        train(cfg, model=NaNAfter(steps + 5), progress=False, log=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(v.isfinite().all() for v in ckpt["model"].values())
    assert all(v.isfinite().all() for v in load_file(tmp_path / "model.safetensors").values())
    assert strict_json(tmp_path / "metrics.json")["summary"]["epochs_done"] == 1
    assert not (tmp_path / "train.lock").exists()


def test_a_non_finite_test_loss_stops_training_too(tmp_path, monkeypatch):
    "Nothing non-finite reaches metrics.json, which strict JSON parsers must read."
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: (float("inf"), 0.5))
    with pytest.raises(FloatingPointError, match="test_loss became NaN or infinite in epoch 1"):
        train(TrainConfig(**TINY, epochs=1, out_dir=str(tmp_path)), progress=False, log=False)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("options,message", [
    (dict(grad_clip=-1.0), "grad_clip must be above 0"),
    (dict(weight_decay=-1.0), "weight_decay must be at least 0"),
    (dict(lr=0.001, min_lr=1.0), "min_lr must be between 0 and lr"),
    (dict(min_lr=float("nan")), "min_lr must be a finite number"),
    (dict(lr=float("inf")), "lr must be a finite number"),
    (dict(lr=0.0), "lr must be above 0"),
    (dict(image_size=16.5), "image_size must be a whole number"),
    (dict(epochs=2.5), "epochs must be a whole number"),
    (dict(image_size=0), "image_size must be at least 1"),
    (dict(drop_path=1.0), "drop_path must be"),
])
def test_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**TINY, **options})


@pytest.mark.parametrize("argv,message", [
    (["--grad-clip", "-1"], "--grad-clip must be above 0"),
    (["--min-lr", "1", "--lr", "0.001"], "--min-lr must be between 0 and lr"),
    (["--min-lr", "nan"], "--min-lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--amp", "fp16", "--device", "cpu"], "use --amp bf16 or --amp off"),
    (["--device", "nonsense"], "invalid choice: 'nonsense'"),
    pytest.param(["--device", "cuda"], "torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_options_get_one_line_before_the_data_loads(tmp_path, capsys, argv, message):
    code, _, err = cli(capsys, *argv, "--dataset", "imagefolder:/no/such/folder",
                       "--out-dir", tmp_path)
    assert code == 2 and message in one_line(err)       # about the option, not the missing folder


# files and faults

def test_disk_full_gets_one_line_and_keeps_the_previous_file(tmp_path):
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, {"epoch": 1})
    def fill(tmp):
        tmp.write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError, match=f"no space left on device: {p}"):
        write_atomic(p, fill)
    assert load_checkpoint(p)["epoch"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"]             # no temporary file


def _mount_tmpfs(path, options):
    "Mount a small tmpfs at path (needs root); False where the OS does not allow it."
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def test_a_full_disk_while_saving_a_checkpoint(tmp_path, capsys):
    "A real full disk: a 4 MB tmpfs, filled after the first epoch (skipped where one cannot mount)."
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=4m"): pytest.skip("cannot mount a tmpfs here")
    try:
        assert cli(capsys, "--epochs", "2", "--stop-after", "1", "--out-dir", disk / "r")[0] == 0
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 400_000))       # room for the weights only
        code, _, err = cli(capsys, "--epochs", "2", "--resume", "--out-dir", disk / "r")
        line = one_line(err)
        assert code == 1 and "no space left on device: " in line and str(disk / "r") in line
        assert load_checkpoint(disk / "r" / "checkpoint.pt")["epoch"] == 1   # the previous one
        assert not [f for f in (disk / "r").iterdir() if f.name.endswith((".tmp", ".lock"))]
        (disk / "filler").unlink()
        assert cli(capsys, "--epochs", "2", "--resume", "--out-dir", disk / "r")[0] == 0
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_read_only_out_dir_is_named_before_training(tmp_path, capsys):
    folder = tmp_path / "ro"
    if not _mount_tmpfs(folder, "size=1m,ro"):
        if os.geteuid() == 0: pytest.skip("cannot make a read-only folder here")
        folder.chmod(0o555)
    try:
        code, _, err = cli(capsys, "--dataset", "imagefolder:/no/such/folder",
                           "--out-dir", folder / "r")
        line = one_line(err)
        assert code == 1 and f"cannot write to the run folder {folder / 'r'}" in line
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_an_out_dir_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "notes").write_text("mine")
    code, _, err = cli(capsys, "--out-dir", tmp_path / "notes")
    assert code == 2 and "is a file, not a folder" in one_line(err)
    assert (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "random"])
def test_a_damaged_checkpoint_is_named(tmp_path, capsys, damage):
    cfg = TrainConfig(**TINY, epochs=2, out_dir=str(tmp_path))
    train(cfg, stop_after=1, progress=False, log=False)
    p = tmp_path / "checkpoint.pt"
    data = p.read_bytes()
    p.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "text": b"hello\n",
                   "random": random.Random(0).randbytes(3000)}[damage])
    code, _, err = cli(capsys, "--epochs", "2", "--resume", "--out-dir", tmp_path)
    line = one_line(err)
    assert code == 2 and f"{p} is not a readable checkpoint" in line and "--overwrite" in line


# DDP: per-rank randomness, metrics over all ranks, the process group destroyed

def _ddp_worker(rank, out, port):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    model = create_model("vit", image_size=16, preset="tiny", in_chans=1, drop_path=0.5)
    masks, losses = [], []
    def record(module, inputs, output):                   # which samples the branch was dropped for
        if module.training: masks.append((output.flatten(1) == 0).all(1).tolist())
    for m in model.modules():
        if type(m).__name__ == "StochasticDepth": m.register_forward_hook(record)
    cross_entropy = torch.nn.functional.cross_entropy
    def logged(logits, y, **kw):
        loss = cross_entropy(logits, y, **kw)
        if "label_smoothing" in kw:                        # training, not evaluation
            losses.append((loss.item() * len(y), len(y), (logits.argmax(1) == y).sum().item()))
        return loss
    training.F.cross_entropy = logged                     # only in this worker process
    cfg = TrainConfig(**TINY, epochs=1, augment=False, device="cpu", out_dir=str(Path(out) / "run"))
    train(cfg, model=model, progress=False, log=False)
    found = dict(masks=masks[:8], losses=losses, initialized=dist.is_initialized())
    torch.save(found, Path(out) / f"{rank}.pt")


def test_ddp_ranks_draw_their_own_masks_and_report_all_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path), 29000 + os.getpid() % 1000), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["masks"] != r1["masks"]                     # stochastic depth differs between ranks
    assert not r0["initialized"] and not r1["initialized"]   # the process group is destroyed
    loss, n, correct = (sum(t[i] for t in r0["losses"] + r1["losses"]) for i in range(3))
    h = strict_json(tmp_path / "run" / "metrics.json")["history"][0]
    assert n == 1437 // 64 * 64
    assert h["train_loss"] == pytest.approx(loss / n, abs=2e-5)
    assert h["train_acc"] == round(correct / n, 5)


# the kill-and-resume guarantee

def test_kill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path):
    "Three SIGKILLs at seeded random moments, each followed by --resume: the same weights, bitwise."
    args = [BIN / "vitsd-train", *FLAGS, "--model", "sl_vit", "--epochs", "6",
            "--warmup-epochs", "1", "--drop-path", "0.1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    whole = subprocess.run([*args, "--out-dir", tmp_path / "whole"], capture_output=True, env=env)
    assert whole.returncode == 0, whole.stderr
    rng, run, kills = random.Random(0), tmp_path / "killed", 0
    while True:
        again = ["--resume"] if (run / "checkpoint.pt").exists() else ["--overwrite"]
        p = subprocess.Popen([*args, "--out-dir", run, *again], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
        if kills == 3:
            out, err = p.communicate()
            assert p.returncode == 0, err
            break
        p.stdout.readline()                              # its header: the data and model are ready
        time.sleep(rng.uniform(0, 4))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        kills += 1
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("whole", "killed"))
    assert a["epoch"] == b["epoch"] == 6
    for k in a["model"]: assert torch.equal(a["model"][k], b["model"][k]), k
    wa = load_file(tmp_path / "whole" / "model.safetensors")
    wb = load_file(run / "model.safetensors")
    for k in wa: assert torch.equal(wa[k], wb[k]), k
    timing = ("epoch_time", "img_per_s")
    strip = lambda hist: [{k: v for k, v in h.items() if k not in timing} for h in hist]
    assert strip(strict_json(run / "metrics.json")["history"]) == strip(a["history"])
    assert not [f.name for f in run.iterdir() if f.name.endswith((".tmp", ".lock"))]
