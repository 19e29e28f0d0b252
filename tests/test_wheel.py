"""Release readiness: the built wheel installs into a clean virtual environment with only its
runtime dependencies, and works there.

The clean environment reuses the runtime dependencies already installed in this environment (torch
is several GB) by linking just those distributions into a folder that the new venv sees through a
.pth file; nothing else of this environment (nbdev, pytest, jupyterlab, Sphinx, ...) is visible
there, and pip (this environment's, run for the new interpreter) installs the wheel with
--no-index, so a missing runtime requirement fails instead of downloading.
"""
import os
import shutil
import subprocess
import sys
import tarfile
from configparser import ConfigParser
from email.parser import Parser
from importlib.metadata import distribution
from pathlib import Path
from zipfile import ZipFile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:                     # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
CFG = ConfigParser(delimiters=["="]); CFG.read(ROOT / "settings.ini")
CFG = CFG["DEFAULT"]
DEV_ONLY = ["nbdev", "execnb", "ghapi", "jupyterlab", "ipykernel", "pytest", "sphinx", "myst_nb",
            "furo", "build", "sklearn", "scipy", "timm"]
# must never be pulled in by `pip install vitsd-nbdev`
HEAVY = {"scikit-learn", "scipy"}
ASSETS = ["vitsd_nbdev/assets/digits.npz", "vitsd_nbdev/assets/DIGITS_LICENSE.md"]


def runtime_closure(requirements):
    "Installed distributions needed by `requirements`, recursively (extras and markers respected)."
    found, done, todo = {}, set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        for extra in {""} | req.extras:          # e.g. torch needs cuda-toolkit[cublas,...]
            if (name, extra) in done: continue
            done.add((name, extra))
            found[name] = dist = distribution(req.name)
            for r in map(Requirement, dist.requires or []):
                if r.marker is None or r.marker.evaluate({"extra": extra}): todo.append(r)
    return found


def link_runtime_site(dists, dest: Path):
    "Symlink the top-level files and folders of each distribution into dest."
    dest.mkdir()
    for dist in dists.values():
        site = Path(dist.locate_file(""))
        for f in dist.files or []:
            top = f.parts[0]
            if top == ".." or (dest / top).exists(): continue
            if (site / top).exists(): (dest / top).symlink_to(site / top)


def run(*args, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    "Build the sdist, then the wheel from it, with `python -m build`, as from a fresh clone."
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    # a copy of the files git tracks (or would track): no build/ or *.egg-info/ left in the
    # checkout by an editable install can add files to the sdist or the wheel
    files = run("git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    for f in files.split("\0"):
        if f and (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    # no --sdist --wheel: the wheel is built from the unpacked sdist,
    # so a file missing from it shows
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src)
    return next(out.glob("*.whl")), next(out.glob("*.tar.gz"))


@pytest.fixture(scope="module")
def clean_env(built, tmp_path_factory):
    "A fresh venv that sees only the runtime dependencies, with the wheel installed into it."
    tmp = tmp_path_factory.mktemp("clean")
    link_runtime_site(runtime_closure(CFG["requirements"].split()), tmp / "runtime")
    run(getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
        tmp / "venv")
    py = tmp / "venv" / "bin" / "python"
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "runtime_deps.pth").write_text(str(tmp / "runtime") + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    run(sys.executable, "-m", "pip", "--python", py, "install", "--no-index", "--quiet", built[0],
        env=env)
    return py, env


def test_built_with_the_declared_backend():
    "The wheel is built without isolation: this environment must meet pyproject's build needs."
    if tomllib is None: pytest.skip("tomllib needs Python 3.11")
    system = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert system["build-backend"] == "setuptools.build_meta"
    for r in map(Requirement, system["requires"]):
        version = distribution(r.name).version
        assert r.specifier.contains(version), f"{r.name} {version} is not {r}"
    setuptools = next(Requirement(r) for r in system["requires"] if r.startswith("setuptools"))
    # license_expression needs setuptools 77
    assert not setuptools.specifier.contains("76.1")


def test_wheel_metadata(built):
    wheel, sdist = built
    with ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
        assert any(n.endswith("licenses/LICENSE") for n in z.namelist())
        assert set(ASSETS) <= set(z.namelist()), "the digits data is missing from the wheel"
    with tarfile.open(sdist) as t:
        assert {f"vitsd_nbdev-{CFG['version']}/{a}" for a in ASSETS} <= set(t.getnames())
    assert meta["Name"] == "vitsd-nbdev" and meta["Version"] == CFG["version"]
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == ">=" + CFG["min_python"]
    assert {u.split(",")[0] for u in meta.get_all("Project-URL")} >= {"Documentation", "Source"}
    assert "vision-transformer" in meta["Keywords"]
    assert any(c.startswith("Programming Language :: Python :: 3.1")
               for c in meta.get_all("Classifier"))
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    runtime = {canonicalize_name(r.name) for r in requires if r.marker is None}
    assert "torch" in runtime and "pillow" in runtime and "safetensors" in runtime
    assert not runtime & ({canonicalize_name(n) for n in DEV_ONLY} | HEAVY)
    assert set(meta.get_all("Provides-Extra")) == {"timm", "export", "dev"}
    by_extra = {e: {canonicalize_name(r.name) for r in requires
                    if r.marker and r.marker.evaluate({"extra": e})}
                for e in ("timm", "export", "dev")}
    assert by_extra["timm"] == {"timm"}
    assert by_extra["export"] == {"onnx", "onnxruntime", "onnxscript"}
    # dev installs the optional parts
    assert by_extra["timm"] | by_extra["export"] <= by_extra["dev"]
    assert sdist.name == f"vitsd_nbdev-{CFG['version']}.tar.gz"


def test_runtime_closure_is_lean(capsys):
    closure = runtime_closure(CFG["requirements"].split())
    assert not set(closure) & HEAVY, f"{set(closure) & HEAVY} in the runtime dependencies"
    size = {n: sum(f.size or 0 for f in d.files or []) for n, d in closure.items()}
    with capsys.disabled():
        largest = sorted(size.items(), key=lambda kv: -kv[1])[:6]
        top = ", ".join(f"{n} {s / 2**20:,.0f}" for n, s in largest)
        print(f"\nruntime closure: {len(closure)} distributions, "
              f"{sum(size.values()) / 2**20:,.0f} MiB installed (largest, MiB: {top})")


def test_installed_wheel_works_without_dev_tools(clean_env, tmp_path):
    py, env = clean_env
    code = f"""
import importlib, pkgutil, torch, vitsd_nbdev
assert vitsd_nbdev.__version__ == {CFG['version']!r}, vitsd_nbdev.__version__
# the wheel, not the source tree
assert 'site-packages' in vitsd_nbdev.__file__, vitsd_nbdev.__file__
for m in pkgutil.walk_packages(vitsd_nbdev.__path__, 'vitsd_nbdev.'):
    importlib.import_module(m.name)
from vitsd_nbdev.data import get_dataset
# packaged data
assert len(get_dataset('digits')) == 1437
assert 'site-packages' in get_dataset.__code__.co_filename
from vitsd_nbdev.vit import create_model
model = create_model('sl_vit', num_classes=3, image_size=16, preset='tiny')
print(tuple(model(torch.zeros(2, 3, 16, 16)).shape))
for dev in {DEV_ONLY!r}:
    assert importlib.util.find_spec(dev) is None, dev + ' is visible in the clean environment'
"""
    assert run(py, "-c", code, cwd=tmp_path, env=env).strip().endswith("(2, 3)")
    scripts = [s.split("=")[0] for s in CFG["console_scripts"].split()]
    for script in scripts:
        assert "usage:" in run(py.parent / script, "--help", cwd=tmp_path, env=env)
    shown = run(sys.executable, "-m", "pip", "--python", py, "show", "vitsd-nbdev", env=env)
    assert f"Version: {CFG['version']}" in shown and "License-Expression: Apache-2.0" in shown
