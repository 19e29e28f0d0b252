"The demo command that `make run` runs."
import subprocess
import sys
from pathlib import Path

from vitsd_nbdev.cli import demo


def test_demo_writes_its_figure(tmp_path):
    res = demo(tmp_path, image_size=32, patch_size=4, dim=32)
    assert res["patches"] == (1, 64, 48) and res["tokens"] == (1, 65, 32)
    assert Path(res["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script_rejects_bad_patch_size_in_one_line(tmp_path):
    exe = Path(sys.executable).with_name("vitsd-demo")
    r = subprocess.run([str(exe), "--out-dir", str(tmp_path), "--patch-size", "5"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not divide" in r.stderr and "Traceback" not in r.stderr
