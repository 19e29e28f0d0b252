"""fp32 against bf16 autocast, ours against vit-pytorch, in one interleaved run (bench.py's machinery).

Usage, from the repository root:
    .venv/bin/python benchmarks/bench_amp.py                    # CPU: writes benchmarks/results/cpu-amp.json
    .venv/bin/python benchmarks/bench_amp.py --device cuda      # a GPU: cuda-amp.json
    .venv/bin/python benchmarks/bench_amp.py --smoke --out /tmp/amp.json   # seconds: checks the harness

The four models of bench.py (ours and the peer's ViT and SL-ViT, the paper's CIFAR configuration) at both
precisions: eight training steps and eight inference passes, each timed once per round in a rotated order, so
a change in the machine's load hits every variant alike. Reported: img/s (median over rounds, range), the
bf16/fp32 speed-up of each model, and ours/peer at each precision. On a CPU, bf16 is refused (one line) where
the CPU lacks bfloat16 in hardware, as `amp_dtype` refuses it for training.
"""
from __future__ import annotations
import argparse, json, os, statistics, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import MODELS, PAPER, SMOKE, build, environment, interleaved, make_step, summary  # noqa: E402
from vitsd_nbdev.training import amp_dtype  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
MODELS_FIRST = next(iter(MODELS))


def run(device: torch.device, arch: dict, batch: int, rounds: int, iters: int, warmup: int,
        precisions=tuple(PRECISIONS)) -> dict:
    "img/s of every model at each precision, training step and inference, interleaved."
    torch.manual_seed(0)
    models = {n: build(n, arch, 32, 4) for n in MODELS}
    res = {}
    for mode in ("train", "infer"):
        steps = {f"{n}@{p}": make_step(m, mode, batch, 32, device, PRECISIONS[p], False)
                 for n, m in models.items() for p in precisions}
        times = interleaved(steps, device, rounds, iters, warmup)
        for key, t in times.items():
            n, p = key.split("@")
            res.setdefault(n, {}).setdefault(p, {})[mode] = dict(summary(t, batch), seconds=t)
    return res


def ratios(res: dict) -> dict:
    "bf16 over fp32 per model, and ours over the peer per precision, from the medians."
    precisions = [p for p in PRECISIONS if p in res[MODELS_FIRST]]
    r = lambda a, pa, b, pb, mode: res[a][pa][mode]["img_s"] / res[b][pb][mode]["img_s"]
    out = {}
    if len(precisions) == 2:
        out = {f"{n} bf16/fp32": {m: r(n, "bf16", n, "fp32", m) for m in ("train", "infer")}
               for n in MODELS}
    for p in precisions:
        for ours, peer in (("ours_sl_vit", "peer_sl_vit"), ("ours_vit", "peer_vit")):
            out[f"{ours}/{peer} {p}"] = {m: r(ours, p, peer, p, m) for m in ("train", "infer")}
    return out


def within_round(res: dict) -> dict:
    "ours/peer speed per precision from the ratio within each round: median, min, max."
    out = {}
    for p in (p for p in PRECISIONS if p in res[MODELS_FIRST]):
        for ours, peer in (("ours_sl_vit", "peer_sl_vit"), ("ours_vit", "peer_vit")):
            for m in ("train", "infer"):
                rr = [tp / to for to, tp in zip(res[ours][p][m]["seconds"], res[peer][p][m]["seconds"])]
                out.setdefault(f"{ours}/{peer} {p}", {})[m] = dict(
                    median=statistics.median(rr), min=min(rr), max=max(rr))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=1, help="timed calls per variant per round")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 or both")
    ap.add_argument("--smoke", action="store_true", help="tiny model, batch 4, one round")
    ap.add_argument("--out", default=None, help="JSON file; default benchmarks/results/<device>-amp.json")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available(): sys.exit("--device cuda given but no CUDA GPU is visible")
    try: amp_dtype(device, "bf16")
    except ValueError as e: sys.exit(str(e))
    precisions = tuple(a.precisions.split(","))
    if not precisions or not set(precisions) <= set(PRECISIONS):
        sys.exit(f"--precisions must be fp32, bf16 or fp32,bf16, got {a.precisions!r}")
    arch, batch, rounds, iters, warmup = (SMOKE, 4, 2, 1, 1) if a.smoke else (PAPER, a.batch, a.rounds, a.iters, 2)
    res = dict(env=environment(device), settings=dict(arch=arch, batch=batch, rounds=rounds, iters=iters,
               precisions=list(precisions), load_average_at_start=os.getloadavg()[0]),
               models=run(device, arch, batch, rounds, iters, warmup, precisions))
    res["settings"]["load_average_at_end"] = os.getloadavg()[0]
    res["ratios"] = ratios(res["models"])
    res["ratios_within_round"] = within_round(res["models"])
    out = Path(a.out or Path(__file__).parent / "results" / f"{device.type}-amp.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp"); tmp.write_text(json.dumps(res, indent=1)); os.replace(tmp, out)
    cols = [(m, p) for m in ("train", "infer") for p in precisions]
    print("| model | " + " | ".join(f"{p} {m}" for m, p in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for n, r in res["models"].items():
        print(f"| {n} | " + " | ".join(f"{r[p][m]['img_s']:.1f}" for m, p in cols) + " |")
    for k, v in res["ratios"].items(): print(f"{k:32s} train {v['train']:.2f}x  infer {v['infer']:.2f}x")
    print("within each round (median, range):")
    for k, v in res["ratios_within_round"].items():
        print(f"{k:32s} " + "  ".join(f"{m} {v[m]['median']:.2f}x ({v[m]['min']:.2f}-{v[m]['max']:.2f})"
                                      for m in ("train", "infer")))
    print(f"-> {out}")


if __name__ == "__main__": main()
