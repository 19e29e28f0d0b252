"""One command for a lent GPU (under 10 minutes): the benchmark at fp32, bf16 and compiled; one full-recipe
CIFAR-10 epoch end to end with a projection of the paper's 300-pass run; exact resume on the GPU. Writes JSON.

Usage, from the repository root:
    .venv/bin/python benchmarks/gpu_check.py --out benchmarks/results/gpu.json                    # CIFAR-10 in ./data
    .venv/bin/python benchmarks/gpu_check.py --data-root /path/with/cifar-10-batches-py --out ...
    .venv/bin/python benchmarks/gpu_check.py --data imagefolder:/path/to/cifar10 --out ...        # train/ test/ folders
    .venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/gpu-smoke.json   # CPU, tiny sizes, digits: seconds

Sections, each written to the JSON as soon as it finishes (a run cut short keeps what it measured):
  bench    ours and vit-pytorch's ViT / SL-ViT at the paper's CIFAR configuration, batch 128, training step and
           inference: fp32 and bf16 eager (interleaved, bench_amp.py), and both SL-ViTs bf16 + torch.compile.
  epoch    `train` for one epoch of CIFAR-10 with the dataset's default recipe (on-device data path, AutoAugment
           included: CIFAR-10's policy for 'cifar10', ImageNet's for an image folder) at the default precision;
           the 300-pass projection = 300 x (training pass + evaluation) of that epoch.
  resume   digits, tiny preset: 2 epochs in one go, the same again, and 1 epoch + resume + 1; are the weights equal
           bit for bit (resume), and is the GPU run-to-run deterministic at all (repeat)?
"""
from __future__ import annotations
import argparse, json, os, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import PAPER, SMOKE, build, environment, interleaved, make_step, summary  # noqa: E402
from bench_amp import ratios, run as run_amp  # noqa: E402
from vitsd_nbdev.fastdata import get_device_loaders  # noqa: E402
from vitsd_nbdev.training import TrainConfig, amp_dtype, evaluate, load_checkpoint, train  # noqa: E402
from vitsd_nbdev.vit import create_model  # noqa: E402

PASSES = 300      # the official run: 100 "epochs" of 3 passes each


def write(out: Path, res: dict):
    "Write the results so far, atomically."
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp"); tmp.write_text(json.dumps(res, indent=1)); os.replace(tmp, out)


def bench(device: torch.device, smoke: bool) -> dict:
    "fp32 and bf16 eager for the four models, then bf16 compiled for both SL-ViTs."
    arch, batch, rounds, iters, warmup = (SMOKE, 4, 1, 1, 1) if smoke else (PAPER, 128, 5, 10, 3)
    res = dict(arch=arch, batch=batch, rounds=rounds, iters=iters)
    try: amp_dtype(device, "bf16")
    except ValueError as e:
        return dict(res, skipped=str(e))
    res["eager"] = run_amp(device, arch, batch, rounds, iters, warmup)
    res["ratios"] = ratios(res["eager"])
    if smoke:
        res["compiled"] = "skipped in --smoke (compilation takes minutes on a CPU)"
        return res
    torch.manual_seed(0)
    models = {n: build(n, arch, 32, 4) for n in ("ours_sl_vit", "peer_sl_vit")}
    res["compiled"] = {n: {} for n in models}
    for mode in ("train", "infer"):
        t0 = time.perf_counter()
        steps = {n: make_step(m, mode, batch, 32, device, torch.bfloat16, True) for n, m in models.items()}
        times = interleaved(steps, device, rounds, iters, warmup)        # warm-up calls compile
        for n, t in times.items(): res["compiled"][n][mode] = summary(t, batch)
        res["compiled"][f"{mode}_wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def epoch(device: torch.device, data: str, root: str, smoke: bool) -> dict:
    "One epoch of the full recipe, timed; the evaluation timed on its own; the 300-pass projection."
    kw = dict(dataset="digits", image_size=16, preset="tiny", batch_size=64) if smoke else dict(dataset=data, data_root=root)
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(**kw, model="sl_vit", epochs=1, warmup_epochs=0, device=device.type, out_dir=d)
        t0 = time.perf_counter()
        train_dl, test_dl, info = get_device_loaders(cfg.dataset, cfg.data_root, cfg.batch_size, True, cfg.image_size,
                                                     device=device)
        load_s = time.perf_counter() - t0                # decoding (cached afterwards) and the copy to the device
        t0 = time.perf_counter()
        s = train(cfg, progress=False, log=False)
        call_s = time.perf_counter() - t0
        h = load_checkpoint(Path(d) / "checkpoint.pt")
        model = create_model(cfg.model, info.num_classes, info.image_size, preset=cfg.preset, in_chans=info.in_chans)
        model.load_state_dict(h["model"])
        dtype = amp_dtype(device, cfg.amp)
        model.to(device)
        evaluate(model, test_dl, device, dtype)           # warm-up
        if device.type == "cuda": torch.cuda.synchronize()
        t0 = time.perf_counter()
        evaluate(model, test_dl, device, dtype)
        eval_s = time.perf_counter() - t0
    train_s = h["history"][0]["epoch_time"]
    return dict(dataset=cfg.dataset, model=cfg.model, precision=str(dtype or torch.float32), recipe=repr(train_dl.augment),
                images_per_epoch=len(train_dl) * cfg.batch_size, load_s=round(load_s, 2), train_call_s=round(call_s, 2),
                train_pass_s=train_s, img_per_s=h["history"][0]["img_per_s"], eval_s=round(eval_s, 3),
                test_acc_after_1_epoch=s["final_acc"],
                projected_300_passes_min=round(PASSES * (train_s + eval_s) / 60, 1),
                projected_300_passes_train_only_min=round(PASSES * train_s / 60, 1))


def resume(device: torch.device, smoke: bool) -> dict:
    "2 epochs, 2 epochs again (not in --smoke), 1 + resume + 1 on the digits: bit-equal weights?"
    with tempfile.TemporaryDirectory() as d:
        cfg = lambda name: TrainConfig(dataset="digits", image_size=16, preset="tiny", model="sl_vit", epochs=2,
                                       warmup_epochs=1, batch_size=64, device=device.type, out_dir=str(Path(d) / name))
        t0 = time.perf_counter()
        train(cfg("whole"), progress=False, log=False)
        if not smoke: train(cfg("again"), progress=False, log=False)
        train(cfg("part"), stop_after=1, progress=False, log=False)
        train(cfg("part"), resume=True, progress=False, log=False)
        a, b = (load_checkpoint(Path(d) / n / "checkpoint.pt") for n in ("whole", "part"))
        c = None if smoke else load_checkpoint(Path(d) / "again" / "checkpoint.pt")
    def compare(x, y):
        diff = max((x["model"][k].float() - y["model"][k].float()).abs().max().item() for k in x["model"])
        same = all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
        acc = [h["test_acc"] for h in x["history"]] == [h["test_acc"] for h in y["history"]]
        return dict(weights_bit_equal=same, max_abs_weight_diff=diff, same_test_accuracies=acc)
    repeat = "skipped in --smoke (the CPU is deterministic)" if smoke else compare(a, c)
    return dict(resume=compare(a, b), repeat=repeat, wall_s=round(time.perf_counter() - t0, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"), help="JSON file")
    ap.add_argument("--data", default="cifar10", help="'cifar10' (torchvision's files in --data-root) or 'imagefolder:<path>'")
    ap.add_argument("--data-root", default="data", help="folder holding torchvision's cifar-10-batches-py")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, digits: checks the script in seconds")
    ap.add_argument("--skip", nargs="*", default=[], choices=["bench", "epoch", "resume"], help="sections to leave out")
    a = ap.parse_args(argv)
    device = torch.device("cpu" if a.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible: run on a GPU machine, or pass --smoke for the CPU check")
    if not a.smoke and "epoch" not in a.skip and a.data == "cifar10" and not (Path(a.data_root) / "cifar-10-batches-py").is_dir():
        sys.exit(f"no CIFAR-10 in {a.data_root}/cifar-10-batches-py: pass --data-root (torchvision's download folder) "
                 "or --data imagefolder:<path>, or --skip epoch")
    out = Path(a.out)
    res = dict(env=environment(device), smoke=a.smoke, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    write(out, res)
    t_all = time.perf_counter()
    for name, fn in (("bench", lambda: bench(device, a.smoke)), ("epoch", lambda: epoch(device, a.data, a.data_root, a.smoke)),
                     ("resume", lambda: resume(device, a.smoke))):
        if name in a.skip: continue
        t0 = time.perf_counter()
        res[name] = fn()
        res[name]["section_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {res[name]['section_s']} s", flush=True)
        write(out, res)
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    write(out, res)
    if "epoch" in res:
        e = res["epoch"]
        print(f"one epoch of {e['dataset']}: {e['train_pass_s']:.1f} s training + {e['eval_s']:.1f} s evaluation "
              f"-> {PASSES} passes ~ {e['projected_300_passes_min']} min")
    if "resume" in res:
        rep = res["resume"]["repeat"]
        print(f"resume bit-equal: {res['resume']['resume']['weights_bit_equal']}, "
              f"repeat bit-equal: {rep['weights_bit_equal'] if isinstance(rep, dict) else rep}")
    print(f"total {res['total_s']} s -> {out}")


if __name__ == "__main__": main()
