"""Where a bf16 step goes: our SL-ViT against vit-pytorch's, PyTorch profiler, self CPU time per op.

Usage, from the repository root (a CPU with bfloat16 in hardware):
    .venv/bin/python benchmarks/profile_bf16.py                  # prints the tables, writes results/profile-bf16.json
    .venv/bin/python benchmarks/profile_bf16.py --smoke --out /tmp/p.json   # seconds: checks the harness

Both SL-ViTs at the paper's CIFAR configuration (bench.py's `build` and `make_step`), batch 128, under bf16
autocast: a training step (forward, loss, backward, AdamW) and an inference pass. Each is warmed up, then
profiled for `--steps` calls; the models alternate call by call so that a change of the machine's load hits
both. Reported per op: self CPU time per call (ms) and its share of the profiled total.
"""
from __future__ import annotations
import argparse, json, os, sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench import PAPER, SMOKE, build, environment, make_step  # noqa: E402

NAMES = ("ours_sl_vit", "peer_sl_vit")


def profile_steps(steps: dict, n: int) -> dict:
    "Self CPU time per op (ms per call) of each step, the steps alternating call by call."
    acc = {k: {} for k in steps}
    for _ in range(n):
        for k, f in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as p: f()
            for e in p.key_averages():
                t, c = acc[k].get(e.key, (0, 0))
                acc[k][e.key] = (t + e.self_cpu_time_total, c + e.count)
    out = {}
    for k, ops in acc.items():
        total = sum(t for t, _ in ops.values())
        rows = sorted(ops.items(), key=lambda r: -r[1][0])
        out[k] = dict(total_ms=total / 1e3 / n,
                      ops=[dict(op=o, self_ms=t / 1e3 / n, share=t / total, calls=c // n)
                           for o, (t, c) in rows])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="profiled calls per model and mode")
    ap.add_argument("--smoke", action="store_true", help="tiny model, batch 4")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile-bf16.json"))
    a = ap.parse_args(argv)
    arch, batch = (SMOKE, 4) if a.smoke else (PAPER, 128)
    dev = torch.device("cpu")
    res = dict(env=environment(dev), batch=batch, steps=a.steps, load_average_at_start=os.getloadavg()[0])
    torch.manual_seed(0)
    models = {n: build(n, arch, 32, 4) for n in NAMES}
    for mode in ("train", "infer"):
        steps = {n: make_step(m, mode, batch, 32, dev, torch.bfloat16, False) for n, m in models.items()}
        for f in steps.values():
            for _ in range(2): f()
        res[mode] = profile_steps(steps, a.steps)
    res["load_average_at_end"] = os.getloadavg()[0]
    for mode in ("train", "infer"):
        for n in NAMES:
            r = res[mode][n]
            print(f"\n{mode} {n}: {r['total_ms']:.1f} ms self CPU per call")
            for o in r["ops"][:15]:
                print(f"  {o['op']:58s} {o['self_ms']:8.2f} ms {100 * o['share']:5.1f}%  x{o['calls']}")
    print(f"load {res['load_average_at_start']:.2f} -> {res['load_average_at_end']:.2f}")
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__": main()
