"""Run timm's own model tests (`tests/test_models.py` of timm's released source) on our registered models.

    python tools/timm_model_tests.py [extra pytest arguments]

Downloads the source distribution of the installed timm version from the package registry (once; kept
in build/timm_tests/), registers our models with `register_timm_models()` in a conftest, and runs the
tests whose names contain `vitsd_`. Where the registry cannot be reached, it says so and exits 0.

timm's test file sorts its models into groups by name and module, in lists at its top; a model family is
added to timm by adding it to those lists. We add ours the same way, and say why:
- NON_STD_FILTERS: our models return tokens [B, N, C] from `forward_features`, not [B, C, H, W] maps,
  like timm's ViT and PiT (`vit_*`, `pit_*`), so they take timm's "non-standard" config test, and its
  `features_only` test through `forward_intermediates` (below) instead of hooks.
- FEAT_INTER_FILTERS: our models (module `timm_sl`) implement `forward_intermediates` and
  `prune_intermediate_layers`, so `features_only=True` uses timm's FeatureGetterNet.
- EXCLUDE_JIT_FILTERS: TorchScript is not supported: our blocks can return their attention weights
  too (`return_weights`, for chapter 8's maps), a tensor-or-tuple result TorchScript cannot type. timm
  excludes its NaFlex models for the same kind of signature. `torch.export` works (chapter 12).
"""
import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "timm_tests"
ADDITIONS = {  # list in timm's test file -> what we add to it
    "NON_STD_FILTERS = [": "'vitsd_*', ",
    "FEAT_INTER_FILTERS = [": "'timm_sl', ",
    "EXCLUDE_JIT_FILTERS = [": "'vitsd_*', ",
}
CONFTEST = '''"Register vitsd_nbdev's models with timm before timm's tests list the models."
from vitsd_nbdev.timm_sl import register_timm_models

register_timm_models()
'''


def timm_test_file(version: str) -> Path | None:
    "timm's tests/test_models.py of `version` with our models added to its lists; None: no download."
    target = WORK / f"timm-{version}" / "test_models.py"
    if target.exists(): return target
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                              "--no-binary", ":all:", f"timm=={version}", "-d", tmp],
                             capture_output=True, text=True, timeout=300)
        sdists = list(Path(tmp).glob("timm-*.tar.gz"))
        if got.returncode or not sdists:
            print(f"SKIPPED timm's model tests: could not download timm {version}'s source "
                  f"distribution ({got.stderr.strip().splitlines()[-1:] or 'no file'})")
            return None
        with tarfile.open(sdists[0]) as tar:
            source = tar.extractfile(f"timm-{version}/tests/test_models.py").read().decode()
    for anchor, added in ADDITIONS.items():
        if source.count(anchor) != 1:
            sys.exit(f"timm {version}'s test_models.py has no single line {anchor!r}: update "
                     "ADDITIONS in tools/timm_model_tests.py for this timm version")
        source = source.replace(anchor, anchor + added)
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.parent / "conftest.py").write_text(CONFTEST)
    target.write_text(source)
    return target


def main(argv: list[str]) -> int:
    version = importlib.metadata.version("timm")
    test_file = timm_test_file(version)
    if test_file is None: return 0
    print(f"timm {version}: running its tests/test_models.py on the vitsd_ models", flush=True)
    select = "vitsd_"
    if "-k" in argv:  # narrow the selection further: ours and the given expression
        i = argv.index("-k")
        select, argv = f"vitsd_ and ({argv[i + 1]})", argv[:i] + argv[i + 2:]
    return subprocess.call([sys.executable, "-m", "pytest", str(test_file), "-k", select,
                            "-p", "no:cacheprovider", "--rootdir", str(test_file.parent),
                            "-W", "ignore::pytest.PytestUnknownMarkWarning", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
