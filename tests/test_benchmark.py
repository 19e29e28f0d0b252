"The benchmark harness (benchmarks/bench.py) in its smoke mode: it runs, and its JSON holds every measurement."
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

def test_benchmark_smoke_mode_runs_and_records_every_number(tmp_path):
    pytest.importorskip("vit_pytorch")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["main"]) == {"ours_vit", "ours_sl_vit", "peer_vit", "peer_sl_vit"}
    for name, m in res["main"].items():
        assert m["params"] > 0
        for mode in ("train", "infer"):
            assert m[mode]["img_s"] > 0 and m[mode]["img_s_min"] <= m[mode]["img_s"] <= m[mode]["img_s_max"]
            assert m[mode]["peak_mem_mb"] is not None, (name, mode)
    # same architecture on both sides; the only difference in size: a temperature per head (ours, as the paper)
    # against one per layer (the peer), i.e. depth x (heads - 1) = 1 x (2 - 1) in the smoke configuration
    assert res["main"]["ours_sl_vit"]["params"] - res["main"]["peer_sl_vit"]["params"] == 1
    assert {k: v["tokens"] for k, v in res["scaling"].items()} == {"32px_patch8": 16, "32px_patch4": 64}
    assert "ours SL-ViT / peer SL-ViT" in r.stdout

def test_benchmark_rejects_a_missing_gpu_in_one_line():
    import torch
    if torch.cuda.is_available(): pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--device", "cuda"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("--device cuda given but no CUDA GPU")
