"""Run the ablation suites of chapters 8 and 9: model variants x seeds (x depths), one \
`train` call each.

Usage, from the repository root:
    .venv/bin/python experiments/ablation.py --suite digits
    # chapter 9: PiT vs SL-PiT
    .venv/bin/python experiments/ablation.py --suite digits_pit
    # CIFAR-10 via torchvision
    .venv/bin/python experiments/ablation.py --suite cifar10_sweep --download
    # CIFAR-10 from an ImageFolder
    .venv/bin/python experiments/ablation.py --suite cifar10_small --cifar10 path/to/cifar10
    # what is done, what is left
    .venv/bin/python experiments/ablation.py --suite cifar10_small --list

The CIFAR-10 suites train on a class-balanced 5,000-image subset of the training split (500 per
class, chosen once with a fixed seed) and test on all 10,000 test images. The data comes from
torchvision's CIFAR-10 (`--download` fetches it into `--data-root`) or from a CIFAR-10 ImageFolder
you pass with `--cifar10` (`train/<class>/*` and `test/<class>/*`).

Each run trains in runs/ablation/<suite>/<run>/ (git-ignored: checkpoint, curves) and saves its
config, per-epoch history, summary and environment to results/<suite>/<run>.json (small,
committed). A run whose JSON exists is skipped, so an interrupted suite is resumed by running the
same command again; an unfinished run restarts from its last epoch checkpoint. JSON files are
written atomically.
"""
from __future__ import annotations
import argparse, hashlib, json, os, platform, subprocess, sys, time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from vitsd_nbdev.training import TrainConfig, load_checkpoint, train
from vitsd_nbdev.vit import ADD_ON_MODELS, VARIANTS

# 10 classes x 500 = 5,000 training images, chosen once with this seed
SUBSET_PER_CLASS, SUBSET_SEED = 500, 0
SUBSET_DIR = "runs/data/cifar10_subset5000"

# the vitsd-demo recipe: tiny preset, 16x16 digits, 40 epochs, batch 64, 5 warm-up epochs, lr 1e-3
DIGITS = dict(dataset="digits", image_size=16, preset="tiny", epochs=40, warmup_epochs=5,
              batch_size=64, lr=1e-3)
# CIFAR-10 subset: the image-folder recipe at 32x32 (patch 4, an 8x8 token grid), 100 epochs,
# evaluated on the 10,000 test images every 5 epochs and after the last
CIFAR = dict(dataset=f"imagefolder:{SUBSET_DIR}", image_size=32, epochs=100, warmup_epochs=10,
             batch_size=128, lr=1e-3, eval_every=5)
LSA_ABLATION = ["vit", "vit_spt", "vit_lsa", "sl_vit", "vit_mask", "vit_temp"]
SUITES = {
    "digits": dict(models=LSA_ABLATION, seeds=[0, 1, 2], cfg=DIGITS),
    # chapter 9: the add-on models, plain and SL, with the same recipe
    # (each model family's own "tiny" preset)
    "digits_pit": dict(models=["pit", "sl_pit"], seeds=[0, 1, 2], cfg=DIGITS),
    "digits_swin": dict(models=["swin", "sl_swin"], seeds=[0, 1, 2], cfg=DIGITS),
    # where does locality start to matter? ViT vs SL-ViT over depth, width 96 (the "small" preset),
    # one seed
    "cifar10_sweep": dict(models=["vit", "sl_vit"], seeds=[0], depths=[4, 6, 2, 9],
                          cfg=dict(CIFAR, preset="small")),
    # the ablation at the chosen preset, and a CNN of about the same size for context (chapter 7a)
    # (depth 4, the "small" preset's, is written out so the JSON records it)
    "cifar10_small": dict(models=LSA_ABLATION + ["resnet20"], seeds=[0, 1, 2],
                          cfg=dict(CIFAR, preset="small", depth=4)),
    # chapter 8's test of a hypothesis: does the official weight decay on s = 1/τ keep the heads
    # from sharpening? ViT + LSA at the same preset, s left undecayed
    "cifar10_tau": dict(models=["vit_lsa"], seeds=[0, 1],
                        cfg=dict(CIFAR, preset="small", depth=4, decay_temperature=False)),
}


def _choose(n_files: int, per_class: int, seed: int, class_index: int) -> np.ndarray:
    "The `per_class` indices (sorted) taken from a class of `n_files` training images."
    return np.sort(np.random.default_rng([seed, class_index]).permutation(n_files)[:per_class])


def subset_from_folder(source: str | Path, dest: str | Path = SUBSET_DIR,
                       per_class: int = SUBSET_PER_CLASS, seed: int = SUBSET_SEED) -> dict:
    "Symlink (idempotently) a CIFAR-10 ImageFolder's balanced train subset and whole test split."
    source, dest = Path(source).resolve(), Path(dest)
    if not (source / "train").is_dir() or not (source / "test").is_dir():
        sys.exit(f"no CIFAR-10 ImageFolder at {source} "
                 "(expected train/<class>/* and test/<class>/*); "
                 "check --cifar10, or use --download")
    chosen = []
    for ci, c in enumerate(sorted(d.name for d in (source / "train").iterdir() if d.is_dir())):
        files = sorted(f.name for f in (source / "train" / c).iterdir()
                       if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(files) < per_class:
            sys.exit(f"class {c} has only {len(files)} training images, fewer than {per_class}")
        chosen += [f"{c}/{files[i]}" for i in _choose(len(files), per_class, seed, ci)]
    for rel in chosen:
        link = dest / "train" / rel
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True); link.symlink_to(source / "train" / rel)
    if not (dest / "test").is_symlink():
        (dest / "test").symlink_to(source / "test", target_is_directory=True)
    return dict(source="imagefolder", per_class=per_class, seed=seed, n_train=len(chosen),
                files_sha1=hashlib.sha1("\n".join(chosen).encode()).hexdigest())


def subset_from_torchvision(root: str | Path, download: bool, dest: str | Path = SUBSET_DIR,
                            per_class: int = SUBSET_PER_CLASS, seed: int = SUBSET_SEED) -> dict:
    "Write (idempotently) torchvision's CIFAR-10 as PNGs: balanced train subset, whole test split."
    from torchvision.datasets import CIFAR10
    from PIL import Image
    dest, chosen = Path(dest), []
    try:
        splits = {s: CIFAR10(root, train=s == "train", download=download)
                  for s in ("train", "test")}
    except RuntimeError as e:
        sys.exit(f"CIFAR-10 not found in {root} ({e}); "
                 "add --download, or pass an ImageFolder with --cifar10")
    for split, ds in splits.items():
        labels = np.asarray(ds.targets)
        for ci, c in enumerate(ds.classes):
            idx = np.flatnonzero(labels == ci)
            if split == "train": idx = idx[_choose(len(idx), per_class, seed, ci)]
            for i in idx:
                f = dest / split / c / f"{i:05d}.png"
                if not f.exists():
                    f.parent.mkdir(parents=True, exist_ok=True)
                    tmp = f.with_name(f".{f.name}.tmp")
                    Image.fromarray(ds.data[i]).save(tmp, format="PNG")
                    os.replace(tmp, f)
                if split == "train": chosen.append(f"{c}/{f.name}")
    return dict(source="torchvision", per_class=per_class, seed=seed, n_train=len(chosen),
                files_sha1=hashlib.sha1("\n".join(chosen).encode()).hexdigest())


def write_json(path: Path, obj: dict):
    "Write `obj` as strict JSON atomically: a temporary file in the same folder, then a rename."
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False)); os.replace(tmp, path)


def cpu_name() -> str:
    "The processor's model name as the OS reports it (e.g. for Linux, /proc/cpuinfo)."
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def learned_temperatures(out_dir: str | Path) -> list[list[float]] | None:
    "τ per head of each attention layer with a learned temperature, from the final checkpoint."
    state = load_checkpoint(Path(out_dir) / "checkpoint.pt")["model"]
    # module order: block 0 first
    rows = [(1 / v if k.endswith("temperature.scale") else v).tolist() for k, v in state.items()
            if k.endswith(("temperature.scale", "temperature.tau"))]
    return rows or None


def git_commit() -> str | None:
    "The repository's checked-out commit (None outside a git clone): which code made a result."
    try: return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError): return None


def run_name(model: str, seed: int, depth: int | None) -> str:
    return f"{model}_seed{seed}" if depth is None else f"{model}_d{depth}_seed{seed}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", required=True, choices=sorted(SUITES))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the suite's seeds")
    ap.add_argument("--models", nargs="+", default=None,
                    choices=list(VARIANTS) + list(ADD_ON_MODELS),
                    help="default: the suite's models")
    ap.add_argument("--depths", type=int, nargs="+", default=None,
                    help="sweep suites: default the suite's depths")
    ap.add_argument("--results", default="results", help="folder of the JSON files")
    ap.add_argument("--runs", default="runs/ablation",
                    help="folder of the run folders (checkpoints; git-ignored)")
    ap.add_argument("--cifar10", default=None, metavar="FOLDER",
                    help="CIFAR-10 as an ImageFolder (train/, test/)")
    ap.add_argument("--download", action="store_true",
                    help="CIFAR-10 from torchvision, downloaded if missing")
    ap.add_argument("--data-root", default="data",
                    help="torchvision's CIFAR-10 folder (with --download)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice)")
    ap.add_argument("--list", action="store_true", help="only list which runs are done")
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    suite = SUITES[a.suite]
    seeds = a.seeds if a.seeds is not None else suite["seeds"]
    models = a.models if a.models is not None else suite["models"]
    depths = a.depths if a.depths is not None else suite.get("depths", [None])
    todo = [(d, s, m) for d in depths for s in seeds for m in models]   # depth- then seed-major
    done = [t for t in todo
            if (Path(a.results) / a.suite / f"{run_name(t[2], t[1], t[0])}.json").exists()]
    print(f"{a.suite}: {len(done)} of {len(todo)} runs done")
    if a.list or len(done) == len(todo): return
    subset = None
    if a.suite.startswith("cifar10"):
        if a.cifar10: subset = subset_from_folder(a.cifar10)
        elif a.download or Path(a.data_root, "cifar-10-batches-py").is_dir():
            subset = subset_from_torchvision(a.data_root, a.download)
        else: ap.error("the CIFAR-10 suites need data: "
                       "--download (torchvision) or --cifar10 FOLDER (an ImageFolder)")
    for depth, seed, model in todo:
        name = run_name(model, seed, depth)
        dst = Path(a.results) / a.suite / f"{name}.json"
        if dst.exists(): continue
        extra = {} if depth is None else dict(depth=depth)
        # CNNs: no ViT presets
        if model.startswith("resnet"): extra |= dict(preset=None, depth=None)
        cfg = TrainConfig(**{**suite["cfg"], **extra}, model=model, seed=seed,
                          out_dir=str(Path(a.runs) / a.suite / name))
        ckpt = Path(cfg.out_dir) / "checkpoint.pt"
        try: resume = ckpt.exists() and load_checkpoint(ckpt)["config"] == asdict(cfg)
        # unreadable or from another version: start again
        except ValueError: resume = False
        t0 = time.time()
        summary = train(cfg, resume=resume, overwrite=not resume, progress=False, log=False)
        hist = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())["history"]
        env = dict(torch=torch.__version__, python=platform.python_version(),
                   machine=platform.machine(), cpu=cpu_name(),
                   threads=torch.get_num_threads(), commit=git_commit(),
                   device="cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name())
        write_json(dst, dict(suite=a.suite, config=asdict(cfg), summary=summary, history=hist,
                             subset=subset, env=env,
                             temperatures=learned_temperatures(cfg.out_dir)))
        print(f"{name}: final {summary['final_acc']:.2%}, best {summary['best_acc']:.2%} "
              f"(epoch {summary['best_epoch']}), {summary['train_time']:.0f}s training, "
              f"{time.time() - t0:.0f}s wall -> {dst}", flush=True)


if __name__ == "__main__": main()
