"""Does bfloat16 autocast on the CPU change what SL-ViT learns? The digits suite's SL-ViT, fp32 vs bf16, 3 seeds.

Usage, from the repository root (a CPU with bfloat16 in hardware; about 2 minutes a run on one core):
    .venv/bin/python benchmarks/bf16_digits.py                     # writes benchmarks/results/digits-bf16.json
    .venv/bin/python benchmarks/bf16_digits.py --seeds 0 --epochs 2 --out /tmp/x.json   # a quick check

Same recipe as chapter 8's digits ablation (experiments/ablation.py, suite "digits"): tiny preset, 16x16 digits,
40 epochs, batch 64, 5 warm-up epochs, lr 1e-3. Runs are written to the JSON as they finish; a run already in
the JSON is skipped, so an interrupted run is continued by the same command.
"""
from __future__ import annotations
import argparse, json, os, statistics, sys, tempfile, time
from pathlib import Path

import torch

from vitsd_nbdev.training import TrainConfig, amp_dtype, train

DIGITS = dict(dataset="digits", image_size=16, preset="tiny", epochs=40, warmup_epochs=5, batch_size=64, lr=1e-3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=DIGITS["epochs"])
    ap.add_argument("--model", default="sl_vit")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "digits-bf16.json"))
    a = ap.parse_args(argv)
    try: amp_dtype(torch.device("cpu"), "bf16")
    except ValueError as e: sys.exit(str(e))
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else dict(runs={})
    res["recipe"] = dict(DIGITS, epochs=a.epochs, warmup_epochs=min(DIGITS["warmup_epochs"], a.epochs), model=a.model)
    res["env"] = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                      cpu=next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"))
    for seed in a.seeds:                                         # seed-major: a partial result has pairs
        for amp in ("off", "bf16"):
            key = f"{a.model}_{amp}_seed{seed}"
            if key in res["runs"]: continue
            with tempfile.TemporaryDirectory() as d:
                cfg = TrainConfig(**dict(DIGITS, epochs=a.epochs, warmup_epochs=min(DIGITS["warmup_epochs"], a.epochs)), model=a.model, seed=seed, amp=amp, device="cpu", out_dir=d)
                t0 = time.time()
                s = train(cfg, progress=False, log=False)
                history = json.loads((Path(d) / "metrics.json").read_text())["history"]
            res["runs"][key] = dict(amp=amp, seed=seed, final_acc=s["final_acc"], best_acc=s["best_acc"],
                                    final_test_loss=history[-1]["test_loss"],
                                    test_acc_by_epoch=[h["test_acc"] for h in history],
                                    wall_s=round(time.time() - t0, 1), load=round(os.getloadavg()[0], 2))
            print(key, res["runs"][key], flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp"); tmp.write_text(json.dumps(res, indent=1)); os.replace(tmp, out)
    for amp in ("off", "bf16"):
        accs = [r["final_acc"] for r in res["runs"].values() if r["amp"] == amp]
        if accs: print(f"{amp:4s} final accuracy {100 * statistics.mean(accs):.2f} ± "
                       f"{100 * (statistics.stdev(accs) if len(accs) > 1 else 0):.2f} % over {len(accs)} seeds")


if __name__ == "__main__": main()
