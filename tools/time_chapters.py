"""Time each chapter as a learner runs it: every cell, in a fresh Jupyter kernel, one chapter at a time.

    python tools/time_chapters.py [NAME ...]     # default: every numbered chapter in nbs/

Like JupyterLab's "Run All Cells" (cells that nbdev_test skips, such as `#| slow` ones, run too), with the
machine's default number of threads, from the kernel's start to the last cell's end. Writes
results/chapter_times.json, which the home page's reading path reads; the notebooks are not changed.
Run it on a quiet machine: the load average before and after each chapter is recorded with its time.
"""
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
OUT = ROOT / "results" / "chapter_times.json"


def cpu_name() -> str:
    "The processor's model name, as the operating system reports it."
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"): return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_seconds(path: Path) -> float:
    "Wall-clock seconds to execute every cell of the notebook at `path` in a fresh kernel."
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=1800, resources={"metadata": {"path": str(path.parent)}}).execute()
    return time.perf_counter() - t0


def main(names: list[str]) -> None:
    names = names or sorted(p.stem for p in NBS.glob("[0-9]*.ipynb"))
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    chapters = old.get("chapters", {})
    for name in names:
        load = os.getloadavg()[0]
        seconds = run_seconds(NBS / f"{name}.ipynb")
        chapters[name] = dict(seconds=round(seconds, 1), load_before=round(load, 2),
                              load_after=round(os.getloadavg()[0], 2))
        print(f"{name}: {seconds:.0f} s (load {load:.1f} before)", flush=True)
    env = dict(cpu=cpu_name(), cores=os.cpu_count(), torch=torch.__version__,
               python=platform.python_version(), date=datetime.date.today().isoformat(),
               how="every cell in a fresh Jupyter kernel (nbclient), default threads, one at a time")
    OUT.write_text(json.dumps(dict(env=env, chapters=dict(sorted(chapters.items()))), indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
