"""Run the ablation suites of chapters 8 and 9: model variants x seeds, one `train` call each.

Usage, from the repository root:
    .venv/bin/python experiments/ablation.py --suite digits
    .venv/bin/python experiments/ablation.py --suite cifar10_subset [--seeds 0 1] [--models vit sl_vit]
    .venv/bin/python experiments/ablation.py --suite cifar10_subset --list     # what is done, what is left
    .venv/bin/python experiments/ablation.py --suite digits_pit                # chapter 9: PiT vs SL-PiT

Each run trains in runs/ablation/<suite>/<model>_seed<k>/ (git-ignored: checkpoint, curves) and saves its
config, per-epoch history and summary to results/<suite>/<model>_seed<k>.json (small, committed).
A run whose JSON exists is skipped, so an interrupted suite is resumed by running the same command again;
an unfinished run restarts from its last epoch checkpoint. JSON files are written atomically.
"""
from __future__ import annotations
import argparse, hashlib, json, os, platform, sys, time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from vitsd_nbdev.training import TrainConfig, load_checkpoint, train
from vitsd_nbdev.vit import ADD_ON_MODELS, VARIANTS

CIFAR_SOURCE = "../shared/data/cifar10"  # the JPEG ImageFolder copy (train/<class>/*.jpg, test/<class>/*.jpg)
SUBSET_PER_CLASS, SUBSET_SEED = 500, 0   # 10 classes x 500 = 5,000 training images, chosen once with this seed

# the vitsd-demo recipe: tiny preset, 16x16 digits, 40 epochs, batch 64, 5 warm-up epochs, lr 1e-3
DIGITS = dict(dataset="digits", image_size=16, preset="tiny", epochs=40, warmup_epochs=5, batch_size=64, lr=1e-3)
SUITES = {
    "digits": dict(models=list(VARIANTS), seeds=[0, 1, 2], cfg=DIGITS),
    # chapter 9: the add-on models, plain and SL, with the same recipe (each model family's own "tiny" preset)
    "digits_pit": dict(models=["pit", "sl_pit"], seeds=[0, 1, 2], cfg=DIGITS),
    "digits_swin": dict(models=["swin", "sl_swin"], seeds=[0, 1, 2], cfg=DIGITS),
    # a class-balanced 5,000-image subset of CIFAR-10's training split, the full 10,000-image test split;
    # tiny preset at 32x32 (patch 4, an 8x8 token grid), the imagefolder default augmentation
    "cifar10_subset": dict(models=list(VARIANTS), seeds=[0, 1], cfg=dict(dataset="imagefolder:runs/data/cifar10_subset5000", image_size=32,
                                                  preset="tiny", epochs=100, warmup_epochs=10, batch_size=128, lr=1e-3)),
}

def cifar10_subset(source: str | Path = CIFAR_SOURCE, dest: str | Path = "runs/data/cifar10_subset5000",
                   per_class: int = SUBSET_PER_CLASS, seed: int = SUBSET_SEED) -> dict:
    "Build (idempotently) an ImageFolder of symlinks: `per_class` training images per class chosen by a seeded permutation, the whole test split."
    source, dest = Path(source).resolve(), Path(dest)
    if not (source / "train").is_dir() or not (source / "test").is_dir():
        sys.exit(f"no CIFAR-10 ImageFolder at {source} (expected train/<class>/*.jpg and test/<class>/*.jpg); pass --cifar-source")
    chosen = []
    for c in sorted(d.name for d in (source / "train").iterdir() if d.is_dir()):
        files = sorted(f.name for f in (source / "train" / c).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(files) < per_class: sys.exit(f"class {c} has only {len(files)} training images, fewer than {per_class}")
        pick = np.sort(np.random.default_rng([seed, len(chosen)]).permutation(len(files))[:per_class])
        chosen += [f"{c}/{files[i]}" for i in pick]
    for rel in chosen:
        link = dest / "train" / rel
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True); link.symlink_to(source / "train" / rel)
    if not (dest / "test").is_symlink(): (dest / "test").symlink_to(source / "test", target_is_directory=True)
    return dict(source=str(source), per_class=per_class, seed=seed, n_train=len(chosen),
                files_sha1=hashlib.sha1("\n".join(chosen).encode()).hexdigest())

def write_json(path: Path, obj: dict):
    "Write `obj` as JSON atomically: a temporary file in the same folder, then a rename."
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1)); os.replace(tmp, path)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", required=True, choices=sorted(SUITES))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the suite's seeds")
    ap.add_argument("--models", nargs="+", default=None, choices=list(VARIANTS) + list(ADD_ON_MODELS), help="default: the suite's models")
    ap.add_argument("--results", default="results", help="folder of the JSON files")
    ap.add_argument("--runs", default="runs/ablation", help="folder of the run folders (checkpoints; git-ignored)")
    ap.add_argument("--cifar-source", default=CIFAR_SOURCE)
    ap.add_argument("--list", action="store_true", help="only list which runs are done")
    a = ap.parse_args(argv)
    suite = SUITES[a.suite]
    seeds = a.seeds if a.seeds is not None else suite["seeds"]
    models = a.models if a.models is not None else suite["models"]
    todo = [(s, m) for s in seeds for m in models]         # seed-major: a partial suite has whole seeds
    done = [(s, m) for s, m in todo if (Path(a.results) / a.suite / f"{m}_seed{s}.json").exists()]
    print(f"{a.suite}: {len(done)} of {len(todo)} runs done")
    if a.list: return
    subset = cifar10_subset(a.cifar_source) if a.suite == "cifar10_subset" else None
    for seed, model in todo:
        dst = Path(a.results) / a.suite / f"{model}_seed{seed}.json"
        if dst.exists(): continue
        cfg = TrainConfig(**suite["cfg"], model=model, seed=seed, out_dir=str(Path(a.runs) / a.suite / f"{model}_seed{seed}"))
        ckpt = Path(cfg.out_dir) / "checkpoint.pt"
        resume = ckpt.exists() and load_checkpoint(ckpt)["config"] == asdict(cfg)
        t0 = time.time()
        summary = train(cfg, resume=resume, progress=False, log=False)
        hist = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())["history"]
        write_json(dst, dict(suite=a.suite, config=asdict(cfg), summary=summary, history=hist, subset=subset,
                             env=dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                                      threads=torch.get_num_threads(), device="cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name())))
        print(f"{model} seed {seed}: final {summary['final_acc']:.2%}, best {summary['best_acc']:.2%} (epoch {summary['best_epoch']}), "
              f"{summary['train_time']:.0f}s training, {time.time() - t0:.0f}s wall -> {dst}", flush=True)

if __name__ == "__main__": main()
