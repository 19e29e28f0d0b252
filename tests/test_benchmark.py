"benchmarks/bench.py in its smoke mode: it runs, and its JSON holds every measurement."
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    "One smoke run of the benchmark: its stdout and its JSON."
    pytest.importorskip("vit_pytorch")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    r = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, json.loads(out.read_text())

def test_benchmark_smoke_mode_runs_and_records_every_number(smoke):
    stdout, res = smoke
    assert set(res["main"]) == {"ours_vit", "ours_sl_vit", "peer_vit", "peer_sl_vit"}
    for name, m in res["main"].items():
        assert m["params"] > 0
        for mode in ("train", "infer"):
            r = m[mode]
            assert r["img_s"] > 0 and r["img_s_min"] <= r["img_s"] <= r["img_s_max"]
            assert m[mode]["peak_mem_mb"] is not None, (name, mode)
    # same architecture on both sides; the only difference in size: a temperature per head (ours, as
    # the paper) against one per layer (the peer): depth x (heads - 1) = 1 x (2 - 1) in smoke mode
    assert res["main"]["ours_sl_vit"]["params"] - res["main"]["peer_sl_vit"]["params"] == 1
    tokens = {k: v["tokens"] for k, v in res["scaling"].items()}
    assert tokens == {"32px_patch8": 16, "32px_patch4": 64}
    assert "ours SL-ViT / peer SL-ViT" in stdout

def test_benchmark_smoke_mode_measures_each_step_against_its_matmul_floor(smoke):
    stdout, res = smoke
    for name, m in res["main"].items():
        for mode in ("train", "infer"):
            f = m[mode]["floor"]
            assert f["img_s"] > 0 and f["gflop"] > 0, (name, mode)
            # the floor is a part of the step's own work, so the fraction is at most 1 in a quiet
            # measurement; in one round on a loaded machine the floor's turn can be hit by a burst
            # of load that the step's turn missed, so a little over 1 is noise, not a bug
            assert 0 < f["fraction_min"] <= f["fraction"] <= f["fraction_max"] <= 1.5, (name, f)
        # training: each forward product and the two of its backward (not the patch input's grad)
        assert m["train"]["floor"]["gflop"] > 2.5 * m["infer"]["floor"]["gflop"]
    assert "fraction of floor" in stdout

def products(name: str, batch: int = 4) -> Counter:
    "Shapes (batch, M, K, N) of the matrix products of one smoke-model forward pass, and how often."
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import SMOKE, build, matmul_shapes
    torch.manual_seed(0)
    gemms = matmul_shapes(build(name, SMOKE, 32, 4), batch, 32, torch.device("cpu"))
    return Counter(g[:4] for g in gemms)

def test_matmul_floor_records_every_product_of_the_model():
    pytest.importorskip("vit_pytorch")
    # smoke SL-ViT: 4 images, 64 patches + class token = 65 tokens, width 32, 2 heads x 16, MLP 64
    expected = Counter({(1, 256, 240, 32): 1,      # SPT: 4 x 64 patches of 5 x 3 x 4 x 4 -> 32
                        (1, 260, 32, 96): 1,       # q, k, v
                        (8, 65, 16, 65): 1,        # q kᵀ, batch x heads
                        (8, 65, 65, 16): 1,        # A v
                        (1, 260, 32, 32): 1,       # output projection
                        (1, 260, 32, 64): 1, (1, 260, 64, 32): 1,   # MLP
                        (1, 4, 32, 10): 1})        # classifier on the class token
    assert products("ours_sl_vit") == expected     # ours: one fused attention kernel (SDPA)
    assert products("peer_sl_vit") == expected     # the peer: explicit matmuls

def test_benchmark_rejects_a_missing_gpu_in_one_line():
    if torch.cuda.is_available(): pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, str(BENCH), "--smoke", "--device", "cuda"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("--device cuda given but no CUDA GPU")

def _needs_cpu_bf16():
    pytest.importorskip("vit_pytorch")
    from vitsd_nbdev.training import amp_dtype
    try: amp_dtype(torch.device("cpu"), "bf16")
    except ValueError: pytest.skip("this CPU has no bfloat16 in hardware")

def test_bench_amp_smoke_records_both_ratios(tmp_path):
    "bench_amp.py: img/s per model and precision, ours/peer from the medians and within each round."
    _needs_cpu_bf16()
    out = tmp_path / "amp.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_amp.py"), "--smoke",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for n, m in res["models"].items():
        for p in ("fp32", "bf16"):
            for mode in ("train", "infer"):
                assert len(m[p][mode]["seconds"]) == m[p][mode]["rounds"] == 2, (n, p, mode)
    w = res["ratios_within_round"]["ours_sl_vit/peer_sl_vit bf16"]["train"]
    assert 0 < w["min"] <= w["median"] <= w["max"]
    assert "within each round" in r.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_amp.py"), "--smoke",
                          "--precisions", "fp16"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--precisions must be" in bad.stderr.strip().splitlines()[-1]

def test_profile_bf16_smoke_lists_the_ops_of_both_models(tmp_path):
    _needs_cpu_bf16()
    out = tmp_path / "profile.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_bf16.py"), "--smoke",
                        "--steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for mode in ("train", "infer"):
        for n in ("ours_sl_vit", "peer_sl_vit"):
            ops = {o["op"] for o in res[mode][n]["ops"]}
            assert res[mode][n]["total_ms"] > 0 and any("mm" in o for o in ops), (mode, n, ops)
    # our bf16 training step: explicit products, the mask added inside the first (no masked_fill);
    # the peer masks with masked_fill; inference: our fused kernel, the peer's explicit softmax
    ops = {(mode, n): {o["op"] for o in res[mode][n]["ops"]} for mode in ("train", "infer")
           for n in ("ours_sl_vit", "peer_sl_vit")}
    assert "aten::baddbmm" in ops["train", "ours_sl_vit"]
    assert not any("masked_fill" in o for o in ops["train", "ours_sl_vit"])
    assert any("masked_fill" in o for o in ops["train", "peer_sl_vit"])
    assert any("scaled_dot_product" in o for o in ops["infer", "ours_sl_vit"])
    assert "aten::_softmax" in ops["infer", "peer_sl_vit"]
