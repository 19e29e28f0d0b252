"""Data-path benchmark: DeviceLoader's full training recipe against the same loader without AutoAugment.

Usage, from the repository root:
    .venv/bin/python benchmarks/data_path.py                   # CPU: writes benchmarks/results/data-path-cpu.json
    .venv/bin/python benchmarks/data_path.py --device cuda     # on a GPU: data-path-cuda.json
    .venv/bin/python benchmarks/data_path.py --smoke --out /tmp/dp.json   # seconds: checks the harness

Random uint8 32x32 RGB images (2,048 by default) in batches of 256, with CIFAR-10's recipe (crop, flip,
AutoAugment CIFAR-10 policy, normalisation, random erasing, Mixup/CutMix). Three loaders, timed one epoch each
per round in a rotated order (interleaved, so a slow phase of a busy machine hits all alike); the result is
the median over rounds in images per second, with the min-max range, and each loader's speed as a fraction of
the no-AutoAugment loader's in the same round (median and range over rounds: robust to a changing load):
  no_autoaugment       the recipe without AutoAugment (the ceiling)
  batched_autoaugment  the recipe as DeviceLoader runs it (BatchAutoAugment: one call per drawn operation)
  per_image_autoaugment the recipe with torchvision's v2.AutoAugment applied image by image (the old path)
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, time
from dataclasses import replace
from pathlib import Path

import torch
from torchvision.transforms import v2

from vitsd_nbdev.data import STATS, AugmentConfig
from vitsd_nbdev.fastdata import DeviceLoader


def cpu_name() -> str:
    "The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def loaders(images: torch.Tensor, batch: int) -> dict[str, DeviceLoader]:
    "The three loaders compared, on the device that holds `images`."
    mean, std = STATS["cifar10"]
    labels = torch.randint(0, 10, (len(images),))
    make = lambda cfg: DeviceLoader(images, labels, batch, mean, std, cfg, 10, shuffle=True, drop_last=True)
    full = AugmentConfig()                                       # the paper's CIFAR recipe
    per_image = make(full)
    tv = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    per_image.autoaugment = lambda x: torch.stack([tv(img) for img in x])
    return {"no_autoaugment": make(replace(full, autoaugment=None)), "batched_autoaugment": make(full),
            "per_image_autoaugment": per_image}


def epoch(loader: DeviceLoader, device: torch.device) -> float:
    "Seconds for one pass over the loader, the batches' last kernel included."
    t0 = time.perf_counter()
    for x, y in loader: pass
    if device.type == "cuda": torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(device: str = "cpu", n: int = 2048, batch: int = 256, rounds: int = 9, threads: int | None = None,
        skip_per_image: bool = False) -> dict:
    "Time the loaders interleaved; a dict with the environment and img/s per loader (median, min, max)."
    if threads: torch.set_num_threads(threads)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(dev)
    ls = loaders(images, batch)
    if skip_per_image: del ls["per_image_autoaugment"]
    for L in ls.values(): epoch(L, dev)                          # warm-up
    names, times = list(ls), {k: [] for k in ls}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            ls[k].set_epoch(r)
            times[k].append(epoch(ls[k], dev))
    imgs = len(ls["no_autoaugment"]) * batch
    out = {k: dict(img_s=imgs / statistics.median(t), img_s_min=imgs / max(t), img_s_max=imgs / min(t))
           for k, t in times.items()}
    for k, r in out.items():                                     # per round: adjacent epochs, alike load
        ratios = [a / b for a, b in zip(times["no_autoaugment"], times[k])]
        r["fraction_of_no_autoaugment"] = statistics.median(ratios)
        r["fraction_min"], r["fraction_max"] = min(ratios), max(ratios)
    return dict(env=dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
                         threads=torch.get_num_threads(), torch=torch.__version__,
                         load=f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the end",
                         date=time.strftime("%Y-%m-%d %H:%M")),
                settings=dict(images=n, batch=batch, rounds=rounds, image_size=32, recipe="cifar10"),
                loaders=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="256 images, batch 64, 2 rounds")
    ap.add_argument("--out", default=None, help="JSON file; default benchmarks/results/data-path-<device>.json")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA GPU is visible")
    n, batch, rounds = (256, 64, 2) if a.smoke else (a.images, a.batch, a.rounds)
    res = run(a.device, n, batch, rounds, a.threads)
    out = Path(a.out or Path(__file__).parent / "results" / f"data-path-{torch.device(a.device).type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)
    print(f"{res['env']['device']}, {res['env']['threads']} thread(s), {res['env']['load']}")
    for k, r in res["loaders"].items():
        print(f"{k:22s} {r['img_s']:8.0f} img/s ({r['img_s_min']:.0f}-{r['img_s_max']:.0f})  "
              f"{r['fraction_of_no_autoaugment']:.0%} of no AutoAugment "
              f"({r['fraction_min']:.0%}-{r['fraction_max']:.0%} over rounds)")
    print(f"-> {out}")


if __name__ == "__main__": main()
