"""Benchmark our ViT and SL-ViT against vit-pytorch's: img/s, memory, and each one's matmul floor.

Usage, from the repository root (vit-pytorch is a dev-only dependency, in `make test`'s venv):
    .venv/bin/python benchmarks/bench.py             # the full CPU benchmark (10 min on 2 cores)
    .venv/bin/python benchmarks/bench.py --smoke     # a tiny configuration: the harness runs
    .venv/bin/python benchmarks/bench.py --device cuda --amp bf16 --compile   # on a GPU

All models are timed in one process, interleaved: every round times each model once, in a rotated
order, so a slower or faster phase of the machine hits every model alike; the reported number is the
median over rounds, with the min-max range. Memory is measured per model in a fresh subprocess (CPU:
growth of the peak resident set during the first call, via Linux's /proc, AdamW's state included;
CUDA: torch.cuda.max_memory_allocated).

The matmul floor: every matrix product a model's forward pass runs (its Linear layers and its
attention's q kᵀ and A v, at the real token count) is recorded from the model itself, then timed
alone at the same shapes (training: each forward product and the two products of its backward;
inference: the forward products). It is timed as one more entry of the same interleaved rounds, and
the step's fraction of its floor (floor time / step time) is taken within each round.
Results go to benchmarks/results/<tag>.json and markdown tables are printed.
"""
from __future__ import annotations
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vitsd_nbdev.vit import count_params, create_model

# the paper's CIFAR model: 32x32, patch 4, dim 192, depth 9, 12 heads x 16, MLP 384
PAPER = dict(dim=192, depth=9, heads=12, head_dim=16, mlp_hidden=384)
SMOKE = dict(dim=32, depth=1, heads=2, head_dim=16, mlp_hidden=64)
MODELS = {  # name -> (library, SL?)
    "ours_vit": ("ours", False), "ours_sl_vit": ("ours", True),
    "peer_vit": ("peer", False), "peer_sl_vit": ("peer", True),
}

def build(name: str, arch: dict, image_size: int, patch_size: int,
          num_classes: int = 10) -> torch.nn.Module:
    "One benchmarked model at the given architecture; peer models come from vit-pytorch."
    lib, sl = MODELS[name]
    if lib == "ours":
        # drop_path=0: the peer has no stochastic depth, so both sides do the same work
        # (in a profiled CPU step its multiplications took 2.5% of the time)
        return create_model("sl_vit" if sl else "vit", num_classes, image_size,
                            patch_size=patch_size, drop_path=0.0, **arch)
    try:
        from vit_pytorch import ViT as PeerViT
        from vit_pytorch.vit_for_small_dataset import ViT as PeerSLViT
    except ImportError:
        sys.exit("vit-pytorch is not installed: pip install vit-pytorch "
                 "(a benchmark-only dependency)")
    return (PeerSLViT if sl else PeerViT)(
        image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=arch["dim"],
        depth=arch["depth"], heads=arch["heads"], dim_head=arch["head_dim"],
        mlp_dim=arch["mlp_hidden"])

def make_step(model, mode: str, batch: int, image_size: int, device, amp: torch.dtype | None,
              compile: bool):
    "A closure running one training step (forward, backward, AdamW) or one inference forward."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    model = model.to(device).train(mode == "train")
    net = torch.compile(model) if compile else model
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    if mode == "infer":
        def step():
            with torch.inference_mode(), autocast():
                net(x)
        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    def step():
        with autocast():
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step

class MatmulRecorder(TorchDispatchMode):
    "Records every matrix product that reaches ATen: (batch, M, K, N, Bᵀ stored?, dA?, dB?)."
    def __init__(self):
        super().__init__()
        self.gemms = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "baddbmm"):  # Linear layers (2-D), explicit attention
            a, b = args[-2:]
            self.gemms.append((math.prod(a.shape[:-2]), *a.shape[-2:], b.shape[-1],
                               not b.is_contiguous(), a.requires_grad, b.requires_grad))
        elif "scaled_dot_product" in name:              # a fused attention kernel: q kᵀ, then A v
            q, k, v = args[:3]
            bh, n, d, nk = math.prod(q.shape[:-2]), q.shape[-2], q.shape[-1], k.shape[-2]
            self.gemms.append((bh, n, d, nk, True, q.requires_grad, k.requires_grad))
            self.gemms.append((bh, n, nk, v.shape[-1], False,
                               q.requires_grad or k.requires_grad, v.requires_grad))
        return func(*args, **(kwargs or {}))

def matmul_shapes(model, batch: int, image_size: int, device) -> list[tuple]:
    "The matrix products of one forward pass of `model` on a batch, from the model itself."
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    with MatmulRecorder() as rec:
        model.to(device).train()(x)
    return rec.gemms

def floor_step(gemms: list[tuple], mode: str, device, dtype: torch.dtype):
    "A closure running only the given matrix products (training: and both of each one's backward)."
    calls = []
    for (bt, m, k, n, b_t, grad_a, grad_b), count in Counter(gemms).items():
        lead = (bt,) if bt > 1 else ()
        mm = torch.bmm if bt > 1 else torch.mm
        t = lambda *s: torch.randn(*lead, *s, device=device, dtype=dtype)
        a, dc = t(m, k), t(m, n)
        b = t(n, k).mT if b_t else t(k, n)        # a Linear's weight is stored [out, in]
        products = [(a, b)]                       # C = A B
        if mode == "train":
            if grad_a: products.append((dc, b.mT))  # dA = dC Bᵀ
            if grad_b: products.append((dc.mT, a) if b_t else (a.mT, dc))  # dB, stored as B
        for x, y in products:
            out = torch.empty(*lead, x.shape[-2], y.shape[-1], device=device, dtype=dtype)
            calls += [(mm, x, y, out)] * count
    def step():
        for mm, x, y, out in calls:
            mm(x, y, out=out)
    step.gflop = sum(2 * math.prod(x.shape) * y.shape[-1] for _, x, y, _ in calls) / 1e9
    return step

def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()

def interleaved(steps: dict, device, rounds: int, iters: int,
                warmup: int) -> dict[str, list[float]]:
    "Seconds per call of each step: `warmup` untimed calls, then `rounds` rounds of `iters` calls."
    for f in steps.values():
        for _ in range(warmup): f()
    sync(device)
    names, times = list(steps), {n: [] for n in steps}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:   # rotated order
            t0 = time.perf_counter()
            for _ in range(iters): steps[n]()
            sync(device)
            times[n].append((time.perf_counter() - t0) / iters)
    return times

def summary(seconds: list[float], batch: int) -> dict:
    "img/s from the median time per call, and the range over rounds."
    return dict(img_s=batch / statistics.median(seconds), img_s_min=batch / max(seconds),
                img_s_max=batch / min(seconds), rounds=len(seconds))

def floor_summary(floor: list[float], step: list[float], batch: int, gflop: float) -> dict:
    "The floor's img/s and the step's fraction of it, floor time / step time within each round."
    fractions = [f / s for f, s in zip(floor, step)]
    return dict(summary(floor, batch), gflop=gflop, fraction=statistics.median(fractions),
                fraction_min=min(fractions), fraction_max=max(fractions))

def _proc_status_kb(field: str) -> int:
    "A field of /proc/self/status (Linux), in kB: VmRSS = resident now, VmHWM = peak resident."
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field + ":")))

def memory_of(name: str, mode: str, arch: dict, image_size: int, patch_size: int, batch: int,
              device, amp, compile: bool) -> int:
    "Peak extra memory of one step of one model, in bytes (run this in a fresh process)."
    torch.manual_seed(0)
    model = build(name, arch, image_size, patch_size)
    step = make_step(model, mode, batch, image_size, device, amp, compile)
    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # the first call, from a fresh process (later calls reuse freed heap: invisible)
    base = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # reset the peak (VmHWM) to the current resident size
    step()
    return (_proc_status_kb("VmHWM") - base) * 1024

def measure_memory(args, name: str, mode: str, arch_name: str, image_size: int, patch_size: int,
                   batch: int) -> int | None:
    "Run `memory_of` in a fresh subprocess of this script; None if it failed (e.g. out of memory)."
    cmd = [sys.executable, __file__, "--memory-of", name, mode, arch_name, str(image_size),
           str(patch_size), str(batch), "--device", args.device, "--amp", args.amp]
    cmd += ["--compile"] if args.compile else []
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        last = r.stderr.strip().splitlines()[-1:]
        print(f"memory of {name} {mode} failed: {last}", file=sys.stderr)
        return None
    return int(r.stdout.strip().splitlines()[-1])

def environment(device) -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                 if l.startswith("model name"))
        cpu = next(names, cpu)
    return dict(device=torch.cuda.get_device_name() if device.type == "cuda" else cpu,
                cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                vit_pytorch=version("vit-pytorch"), python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"), load_average_at_start=os.getloadavg()[0])

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, batch 4, one round: only checks that the harness runs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast dtype")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every model (ours and the peer's)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's CPU threads (default: torch's choice, one per core)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3, help="timed calls per model per round")
    ap.add_argument("--scaling-batch", type=int, default=8, help="batch of the token-count sweep")
    ap.add_argument("--no-sweep", action="store_true",
                    help="skip the token-count sweep (e.g. with --compile: 36 more compilations)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", default=None,
                    help="JSON file; default: benchmarks/results/"
                         "<device>[-<amp>][-compile][-smoke].json")
    ap.add_argument("--memory-of", nargs=6, help=argparse.SUPPRESS,
                    metavar=("MODEL", "MODE", "ARCH", "IMAGE", "PATCH", "BATCH"))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but no CUDA GPU is visible")
    if a.threads is not None:
        if a.threads < 1: sys.exit(f"--threads must be at least 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]
    if a.memory_of:
        name, mode, arch_name, image, patch, batch = a.memory_of
        arch = {"paper": PAPER, "smoke": SMOKE}[arch_name]
        print(memory_of(name, mode, arch, int(image), int(patch), int(batch), device, amp,
                        a.compile))
        return
    arch_name, arch = ("smoke", SMOKE) if a.smoke else ("paper", PAPER)
    batch, rounds, iters, warmup = (4, 1, 1, 1) if a.smoke else (a.batch, a.rounds, a.iters, 2)
    sweep = [(32, 8), (32, 4)] if a.smoke else [(s, p) for s in (32, 64) for p in (8, 4, 2)]
    sweep = [] if a.no_sweep else sweep
    res = dict(env=environment(device), settings=dict(
        arch=arch, batch=batch, rounds=rounds, iters=iters, amp=a.amp, compile=a.compile,
        scaling_batch=a.scaling_batch), main={}, scaling={})

    # 1. the paper's CIFAR configuration: training step and inference, the four models and their
    #    matmul floors interleaved
    torch.manual_seed(0)
    models = {n: build(n, arch, 32, 4) for n in MODELS}
    gemms = {n: matmul_shapes(m, batch, 32, device) for n, m in models.items()}
    for mode in ("train", "infer"):
        steps = {n: make_step(m, mode, batch, 32, device, amp, a.compile)
                 for n, m in models.items()}
        floors = {n: floor_step(g, mode, device, amp or torch.float32) for n, g in gemms.items()}
        times = interleaved({**steps, **{f"{n} floor": f for n, f in floors.items()}},
                            device, rounds, iters, warmup)
        for n in MODELS:
            r = res["main"].setdefault(n, dict(params=count_params(models[n])))
            r[mode] = summary(times[n], batch)
            r[mode]["floor"] = floor_summary(times[f"{n} floor"], times[n], batch, floors[n].gflop)
            mem = None if a.no_memory else measure_memory(a, n, mode, arch_name, 32, 4, batch)
            r[mode]["peak_mem_mb"] = None if mem is None else round(mem / 2**20, 1)
            f = r[mode]["floor"]
            print(f"{n:12s} {mode:5s} {r[mode]['img_s']:8.1f} img/s, floor {f['img_s']:8.1f} img/s,"
                  f" fraction {f['fraction']:.2f}, memory {r[mode]['peak_mem_mb']} MB", flush=True)

    # 2. how time grows with the number of tokens: patch 8 -> 4 -> 2 on 32x32 and 64x64 inputs
    sbatch = 2 if a.smoke else a.scaling_batch
    for image_size, patch in sweep:
        key = f"{image_size}px_patch{patch}"
        ms = {n: build(n, arch, image_size, patch)
              for n in ("ours_vit", "ours_sl_vit", "peer_sl_vit")}
        res["scaling"][key] = dict(tokens=(image_size // patch) ** 2)
        for mode in ("train", "infer"):
            steps = {n: make_step(m, mode, sbatch, image_size, device, amp, a.compile)
                     for n, m in ms.items()}
            times = interleaved(steps, device, max(rounds // 2, 1), 1, 1)
            for n in ms: res["scaling"][key].setdefault(n, {})[mode] = summary(times[n], sbatch)
        speeds = (f"{n} train {res['scaling'][key][n]['train']['img_s']:.1f} img/s" for n in ms)
        print(f"{key}: " + ", ".join(speeds), flush=True)

    res["env"]["load_average_at_end"] = os.getloadavg()[0]
    tag = device.type + (f"-{a.amp}" if amp else "") + ("-compile" if a.compile else "")
    tag += "-smoke" if a.smoke else ""
    out = Path(a.out or Path(__file__).parent / "results" / f"{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)
    print(markdown(res))
    print(f"-> {out}")

def markdown(res: dict) -> str:
    "The results as markdown tables: main comparison, ratios, the matmul floors, the token sweep."
    m = res["main"]
    cell = lambda d: f"{d['img_s']:.1f} ({d['img_s_min']:.1f}–{d['img_s_max']:.1f})"
    lines = ["| model | params | train img/s (range) | infer img/s (range) | train mem MB "
             "| infer mem MB |", "|---|---|---|---|---|---|"]
    for n, r in m.items():
        lines.append(f"| {n} | {r['params']/1e6:.3f}M | {cell(r['train'])} | {cell(r['infer'])} | "
                     f"{r['train']['peak_mem_mb']} | {r['infer']['peak_mem_mb']} |")
    ratio = lambda a, b, mode: m[a][mode]["img_s"] / m[b][mode]["img_s"]
    lines += ["", "| ratio | train | infer |", "|---|---|---|"]
    for label, a, b in [("ours SL-ViT / peer SL-ViT", "ours_sl_vit", "peer_sl_vit"),
                        ("ours ViT / peer ViT", "ours_vit", "peer_vit"),
                        ("ours ViT / ours SL-ViT (SPT+LSA overhead)", "ours_vit", "ours_sl_vit")]:
        lines.append(f"| {label} | {ratio(a, b, 'train'):.2f} | {ratio(a, b, 'infer'):.2f} |")
    lines += ["", "| model | mode | step img/s | floor img/s | fraction of floor (range) "
              "| floor GFLOP |", "|---|---|---|---|---|---|"]
    for n, r in m.items():
        for mode in ("train", "infer"):
            f = r[mode]["floor"]
            lines.append(f"| {n} | {mode} | {r[mode]['img_s']:.1f} | {f['img_s']:.1f} | "
                         f"{f['fraction']:.2f} ({f['fraction_min']:.2f}–{f['fraction_max']:.2f}) | "
                         f"{f['gflop']:.3g} |")
    if not res["scaling"]: return "\n".join(lines)
    lines += ["", "| input, patch | tokens | ours ViT train | ours SL-ViT train "
              "| peer SL-ViT train | ours SL-ViT infer | peer SL-ViT infer |",
              "|---|---|---|---|---|---|---|"]
    for k, r in res["scaling"].items():
        nums = [r["ours_vit"]["train"], r["ours_sl_vit"]["train"], r["peer_sl_vit"]["train"],
                r["ours_sl_vit"]["infer"], r["peer_sl_vit"]["infer"]]
        lines.append(f"| {k} | {r['tokens']} | " + " | ".join(f"{d['img_s']:.1f}" for d in nums)
                     + " |")
    return "\n".join(lines)

if __name__ == "__main__": main()
