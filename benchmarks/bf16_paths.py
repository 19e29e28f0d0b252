"""Our SL-ViT's bf16 attention path before and after the profile, against vit-pytorch's, in one interleaved run.

Usage, from the repository root (a CPU with bfloat16 in hardware):
    .venv/bin/python benchmarks/bf16_paths.py                        # wall clock, torch's threads
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bf16_paths.py --cpu-time --out benchmarks/results/bf16-paths-cputime.json

Three variants at the paper's CIFAR configuration, batch 128, under bf16 autocast (bench.py's `build`,
`make_step` and `interleaved`): our SL-ViT with the bf16 training path as it was before the profile
("before": `attention_weights` then `@ v`, i.e. the logits divided by τ and a `masked_fill`), our SL-ViT
as it is ("now": τ in the queries, the mask added inside the first product), and vit-pytorch's SL-ViT.
Inference uses the fused kernel in both of ours (unchanged), so it is timed once. Reported: img/s and
our speed over the peer's taken within each round (median and range). `--cpu-time` times each call by
the CPU time of the calling thread instead of the wall clock: with one thread (OMP_NUM_THREADS=1) that
is the whole of the step's work and is not stretched when other jobs share the cores.
"""
from __future__ import annotations
import argparse, json, os, statistics, sys, time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402
from bench import PAPER, SMOKE, build, environment, interleaved, make_step  # noqa: E402
import vitsd_nbdev.lsa as lsa  # noqa: E402

NOW = lsa.locality_attention


def before(q, k, v, temperature, diag_mask=True, bias=None):
    "The bf16 CPU training path before the profile: explicit weights, then @ v."
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad:
        lsa._check_qkv(q, k, v)
        return lsa.attention_weights(q, k, temperature, diag_mask, bias) @ v
    return NOW(q, k, v, temperature, diag_mask, bias)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--cpu-time", action="store_true", help="time by the thread's CPU time")
    ap.add_argument("--smoke", action="store_true", help="tiny model, batch 4, 2 rounds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bf16-paths.json"))
    a = ap.parse_args(argv)
    arch, batch, rounds = (SMOKE, 4, 2) if a.smoke else (PAPER, 128, a.rounds)
    if a.cpu_time:  # bench.interleaved reads its clock as time.perf_counter
        bench.time = SimpleNamespace(perf_counter=time.thread_time, strftime=time.strftime)
    dev = torch.device("cpu")
    torch.manual_seed(0)
    ours, peer = build("ours_sl_vit", arch, 32, 4), build("peer_sl_vit", arch, 32, 4)
    res = dict(env=environment(dev), batch=batch, rounds=rounds,
               clock="thread CPU time" if a.cpu_time else "wall clock", modes={})
    for mode, variants in (("train", ("before", "now")), ("infer", ("now",))):
        def with_path(f, impl):
            def step():
                lsa.locality_attention = impl
                try: f()
                finally: lsa.locality_attention = NOW
            return step
        steps = {v: with_path(make_step(ours, mode, batch, 32, dev, torch.bfloat16, False),
                              before if v == "before" else NOW) for v in variants}
        steps["peer"] = make_step(peer, mode, batch, 32, dev, torch.bfloat16, False)
        l0 = os.getloadavg()[0]
        t = interleaved(steps, dev, rounds, 1, 2)
        out = dict(load_average=[l0, os.getloadavg()[0]])
        for n, s in t.items():
            speed = [p / x for x, p in zip(s, t["peer"])]
            out[n] = dict(img_s=batch / statistics.median(s), speed_over_peer=statistics.median(speed),
                          speed_over_peer_min=min(speed), speed_over_peer_max=max(speed), seconds=s)
            print(f"{mode} {n:7s} {out[n]['img_s']:7.1f} img/s  ours/peer {out[n]['speed_over_peer']:.2f}x "
                  f"({out[n]['speed_over_peer_min']:.2f}-{out[n]['speed_over_peer_max']:.2f})")
        print(f"{mode}: load average {l0:.2f} -> {os.getloadavg()[0]:.2f} ({res['clock']})")
        res["modes"][mode] = out
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__": main()
