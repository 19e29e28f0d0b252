"""Benchmark our ViT and SL-ViT against vit-pytorch's small-dataset ViT: training step and inference, img/s and memory.

Usage, from the repository root (vit-pytorch is a dev-only dependency, installed by `make test`'s venv):
    .venv/bin/python benchmarks/bench.py                       # the full CPU benchmark (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/bench.py --smoke               # a tiny configuration, seconds: checks the harness runs
    .venv/bin/python benchmarks/bench.py --device cuda --amp bf16 --compile   # on a GPU

All models are timed in one process, interleaved: every round times each model once, in a rotated order, so a
slower or faster phase of the machine hits every model alike; the reported number is the median over rounds,
with the min-max range. Memory is measured per model in a fresh subprocess (CPU: growth of the peak resident
set during the first call, via Linux's /proc, AdamW's state included; CUDA: torch.cuda.max_memory_allocated). Results go to benchmarks/results/<tag>.json
and a markdown table is printed.
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, subprocess, sys, time
from importlib.metadata import version
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from vitsd_nbdev.vit import count_params, create_model

# the paper's CIFAR model: 32x32, patch 4, dim 192, depth 9, 12 heads x 16, MLP 384
PAPER = dict(dim=192, depth=9, heads=12, head_dim=16, mlp_hidden=384)
SMOKE = dict(dim=32, depth=1, heads=2, head_dim=16, mlp_hidden=64)
MODELS = {  # name -> (library, SL?)
    "ours_vit": ("ours", False), "ours_sl_vit": ("ours", True),
    "peer_vit": ("peer", False), "peer_sl_vit": ("peer", True),
}

def build(name: str, arch: dict, image_size: int, patch_size: int, num_classes: int = 10) -> torch.nn.Module:
    "One benchmarked model at the given architecture; peer models come from vit-pytorch."
    lib, sl = MODELS[name]
    if lib == "ours":
        # drop_path=0: the peer has no stochastic depth, so both sides do the same work (in a profiled CPU step its multiplications took 2.5% of the time)
        return create_model("sl_vit" if sl else "vit", num_classes, image_size, patch_size=patch_size, drop_path=0.0, **arch)
    try:
        from vit_pytorch import ViT as PeerViT
        from vit_pytorch.vit_for_small_dataset import ViT as PeerSLViT
    except ImportError: sys.exit("vit-pytorch is not installed: pip install vit-pytorch (a benchmark-only dependency)")
    return (PeerSLViT if sl else PeerViT)(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=arch["dim"],
                                          depth=arch["depth"], heads=arch["heads"], dim_head=arch["head_dim"], mlp_dim=arch["mlp_hidden"])

def make_step(model, mode: str, batch: int, image_size: int, device, amp: torch.dtype | None, compile: bool):
    "A closure running one training step (forward, backward, AdamW) or one inference forward on a fixed random batch."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    model = model.to(device).train(mode == "train")
    net = torch.compile(model) if compile else model
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    if mode == "infer":
        def step():
            with torch.inference_mode(), autocast(): net(x)
        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    def step():
        with autocast(): loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return step

def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()

def interleaved(steps: dict, device, rounds: int, iters: int, warmup: int) -> dict[str, list[float]]:
    "Seconds per call of each step: `warmup` untimed calls each, then `rounds` rounds of `iters` timed calls, in rotated order."
    for f in steps.values():
        for _ in range(warmup): f()
    sync(device)
    names, times = list(steps), {n: [] for n in steps}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(iters): steps[n]()
            sync(device)
            times[n].append((time.perf_counter() - t0) / iters)
    return times

def summary(seconds: list[float], batch: int) -> dict:
    "img/s from the median time per call, and the range over rounds."
    return dict(img_s=batch / statistics.median(seconds), img_s_min=batch / max(seconds), img_s_max=batch / min(seconds), rounds=len(seconds))

def _proc_status_kb(field: str) -> int:
    "A memory field of /proc/self/status (Linux), in kB: VmRSS = resident now, VmHWM = peak resident."
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field + ":")))

def memory_of(name: str, mode: str, arch: dict, image_size: int, patch_size: int, batch: int, device, amp, compile: bool) -> int:
    "Peak extra memory of one step of one model, in bytes (run this in a fresh process)."
    torch.manual_seed(0)
    step = make_step(build(name, arch, image_size, patch_size), mode, batch, image_size, device, amp, compile)
    if device.type == "cuda":
        step(); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated(); step(); torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _proc_status_kb("VmRSS")        # the first call, from a fresh process (later calls reuse freed heap: invisible)
    with open("/proc/self/clear_refs", "w") as f: f.write("5")   # reset the peak (VmHWM) to the current resident size
    step()
    return (_proc_status_kb("VmHWM") - base) * 1024

def measure_memory(args, name: str, mode: str, arch_name: str, image_size: int, patch_size: int, batch: int) -> int | None:
    "Run `memory_of` in a fresh subprocess of this script; None if it failed (e.g. out of memory)."
    cmd = [sys.executable, __file__, "--memory-of", name, mode, arch_name, str(image_size), str(patch_size), str(batch),
           "--device", args.device, "--amp", args.amp] + (["--compile"] if args.compile else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode: print(f"memory of {name} {mode} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr); return None
    return int(r.stdout.strip().splitlines()[-1])

def environment(device) -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()) \
          if Path("/proc/cpuinfo").exists() else platform.processor()
    return dict(device=torch.cuda.get_device_name() if device.type == "cuda" else cpu, cpu_threads=torch.get_num_threads(),
                torch=torch.__version__, vit_pytorch=version("vit-pytorch"), python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"))

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, batch 4, one round: only checks that the harness runs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast dtype (GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (ours and the peer's)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3, help="timed calls per model per round")
    ap.add_argument("--scaling-batch", type=int, default=8, help="batch of the token-count sweep")
    ap.add_argument("--no-sweep", action="store_true", help="skip the token-count sweep (e.g. with --compile: 36 more compilations)")
    ap.add_argument("--out", default=None, help="JSON file; default benchmarks/results/<device>[-<amp>][-compile][-smoke].json")
    ap.add_argument("--memory-of", nargs=6, metavar=("MODEL", "MODE", "ARCH", "IMAGE", "PATCH", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available(): sys.exit("--device cuda given but no CUDA GPU is visible")
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]
    if a.memory_of:
        name, mode, arch_name, image, patch, batch = a.memory_of
        print(memory_of(name, mode, {"paper": PAPER, "smoke": SMOKE}[arch_name], int(image), int(patch), int(batch), device, amp, a.compile))
        return
    arch_name, arch = ("smoke", SMOKE) if a.smoke else ("paper", PAPER)
    batch, rounds, iters, warmup = (4, 1, 1, 1) if a.smoke else (a.batch, a.rounds, a.iters, 2)
    sweep = [] if a.no_sweep else [(32, 8), (32, 4)] if a.smoke else [(32, 8), (32, 4), (32, 2), (64, 8), (64, 4), (64, 2)]
    res = dict(env=environment(device), settings=dict(arch=arch, batch=batch, rounds=rounds, iters=iters, amp=a.amp,
               compile=a.compile, scaling_batch=a.scaling_batch), main={}, scaling={})

    # 1. the paper's CIFAR configuration: training step and inference, the four models interleaved
    torch.manual_seed(0)
    models = {n: build(n, arch, 32, 4) for n in MODELS}
    for mode in ("train", "infer"):
        steps = {n: make_step(m, mode, batch, 32, device, amp, a.compile) for n, m in models.items()}
        times = interleaved(steps, device, rounds, iters, warmup)
        for n in MODELS:
            res["main"].setdefault(n, dict(params=count_params(models[n])))[mode] = summary(times[n], batch)
            res["main"][n][mode]["peak_mem_mb"] = (lambda b: None if b is None else round(b / 2**20, 1))(
                measure_memory(a, n, mode, arch_name, 32, 4, batch))
            print(f"{n:12s} {mode:5s} {res['main'][n][mode]['img_s']:8.1f} img/s  memory {res['main'][n][mode]['peak_mem_mb']} MB", flush=True)

    # 2. how time grows with the number of tokens: patch 8 -> 4 -> 2 on 32x32 and 64x64 inputs
    for image_size, patch in sweep:
        key = f"{image_size}px_patch{patch}"
        ms = {n: build(n, arch, image_size, patch) for n in ("ours_vit", "ours_sl_vit", "peer_sl_vit")}
        res["scaling"][key] = dict(tokens=(image_size // patch) ** 2)
        for mode in ("train", "infer"):
            steps = {n: make_step(m, mode, a.scaling_batch if not a.smoke else 2, image_size, device, amp, a.compile) for n, m in ms.items()}
            times = interleaved(steps, device, max(rounds // 2, 1), 1, 1)
            for n in ms: res["scaling"][key].setdefault(n, {})[mode] = summary(times[n], a.scaling_batch if not a.smoke else 2)
        print(f"{key}: " + ", ".join(f"{n} train {res['scaling'][key][n]['train']['img_s']:.1f} img/s" for n in ms), flush=True)

    tag = device.type + (f"-{a.amp}" if amp else "") + ("-compile" if a.compile else "") + ("-smoke" if a.smoke else "")
    out = Path(a.out or Path(__file__).parent / "results" / f"{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp"); tmp.write_text(json.dumps(res, indent=1)); os.replace(tmp, out)
    print(markdown(res)); print(f"-> {out}")

def markdown(res: dict) -> str:
    "The results as markdown tables: main comparison with ratios, then the token sweep."
    m = res["main"]
    lines = ["| model | params | train img/s (range) | infer img/s (range) | train mem MB | infer mem MB |", "|---|---|---|---|---|---|"]
    for n, r in m.items():
        cell = lambda d: f"{d['img_s']:.1f} ({d['img_s_min']:.1f}–{d['img_s_max']:.1f})"
        lines.append(f"| {n} | {r['params']/1e6:.3f}M | {cell(r['train'])} | {cell(r['infer'])} | {r['train']['peak_mem_mb']} | {r['infer']['peak_mem_mb']} |")
    ratio = lambda a, b, mode: m[a][mode]["img_s"] / m[b][mode]["img_s"]
    lines += ["", "| ratio | train | infer |", "|---|---|---|"]
    for label, a, b in [("ours SL-ViT / peer SL-ViT", "ours_sl_vit", "peer_sl_vit"), ("ours ViT / peer ViT", "ours_vit", "peer_vit"),
                        ("ours ViT / ours SL-ViT (SPT+LSA overhead)", "ours_vit", "ours_sl_vit")]:
        lines.append(f"| {label} | {ratio(a, b, 'train'):.2f} | {ratio(a, b, 'infer'):.2f} |")
    if not res["scaling"]: return "\n".join(lines)
    lines += ["", "| input, patch | tokens | ours ViT train | ours SL-ViT train | peer SL-ViT train | ours SL-ViT infer | peer SL-ViT infer |", "|---|---|---|---|---|---|---|"]
    for k, r in res["scaling"].items():
        lines.append(f"| {k} | {r['tokens']} | {r['ours_vit']['train']['img_s']:.1f} | {r['ours_sl_vit']['train']['img_s']:.1f} | "
                     f"{r['peer_sl_vit']['train']['img_s']:.1f} | {r['ours_sl_vit']['infer']['img_s']:.1f} | {r['peer_sl_vit']['infer']['img_s']:.1f} |")
    return "\n".join(lines)

if __name__ == "__main__": main()
