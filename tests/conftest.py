"Shared checks of the tests: what a finished run folder holds."
import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitsd_nbdev.fastdata import get_device_loaders   # the batch loaders (appendix 13)
from vitsd_nbdev.training import evaluate, load_checkpoint
from vitsd_nbdev.vit import create_model


def check_run_folder(out: str | Path) -> dict:
    "Check a finished run folder's content against itself; returns metrics.json."
    out = Path(out)
    run = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    cfg, history, summary = run["train"], metrics["history"], metrics["summary"]
    assert metrics["config"] == cfg and run["model"]["name"] == cfg["model"]
    assert [h["epoch"] for h in history] == list(range(1, cfg["epochs"] + 1))
    assert summary["epochs_done"] == cfg["epochs"]
    assert summary["final_acc"] == history[-1]["test_acc"]
    key = "val_acc" if cfg["val_split"] else "test_acc"       # what chooses the best epoch
    best = max((h for h in history if h[key] is not None), key=lambda h: h[key])
    assert (summary["best_epoch"], summary["best_acc"]) == (best["epoch"], best["test_acc"])
    with open(out / "metrics.csv", newline="") as f: rows = list(csv.DictReader(f))
    assert rows == [{k: "" if v is None else str(v) for k, v in h.items()} for h in history]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == cfg["epochs"] and ckpt["history"] == history
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == ckpt["model"].keys()
    for k, v in weights.items(): assert torch.equal(v, ckpt["model"][k]), k
    _, test_dl, _ = get_device_loaders(cfg["dataset"], cfg["data_root"], 256, False,
                                       cfg["image_size"])
    for name, acc in (("model", summary["final_acc"]), ("best", summary["best_acc"])):
        model = create_model(**run["model"])
        model.load_state_dict(load_file(out / f"{name}.safetensors"))
        assert round(evaluate(model, test_dl, torch.device("cpu"))[1], 5) == acc, name
    with Image.open(out / "curves.png") as im: assert im.format == "PNG" and min(im.size) > 100
    return metrics


@pytest.fixture
def run_folder_check():
    "`check_run_folder`, for the tests that train a run."
    return check_run_folder
