"The one-command GPU check (benchmarks/gpu_check.py) in its CPU smoke mode: CI runs every section."
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_mode_runs_every_section(tmp_path):
    pytest.importorskip("vit_pytorch")
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["smoke"] is True and res["total_s"] > 0
    b = res["bench"]
    # a CPU without bfloat16 skips the benchmark
    if "skipped" not in b:
        for name, m in b["eager"].items():
            for p in ("fp32", "bf16"):
                assert m[p]["train"]["img_s"] > 0 and m[p]["infer"]["img_s"] > 0, (name, p)
        assert "ours_sl_vit/peer_sl_vit bf16" in b["ratios"]
    e = res["epoch"]
    assert e["dataset"] == "digits" and e["train_pass_s"] > 0 and e["eval_s"] > 0
    assert e["projected_300_passes_min"] >= e["projected_300_passes_train_only_min"] > 0
    assert res["resume"]["resume"] == dict(weights_bit_equal=True, max_abs_weight_diff=0.0,
                                           same_test_accuracies=True)


def test_gpu_check_refuses_a_missing_gpu_in_one_line():
    if torch.cuda.is_available(): pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", "/dev/null"],
                       capture_output=True, text=True)
    assert (r.returncode != 0
            and r.stderr.strip().splitlines()[-1].startswith("no CUDA GPU is visible"))
