"The command line (chapter 10): --help and --version answer without torch, from lists kept equal to the library's."
import configparser
import inspect
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from vitsd_nbdev import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision")


def _console_scripts() -> dict[str, str]:
    "settings.ini's console scripts: command -> 'module:function' (what pip installs)."
    ini = configparser.ConfigParser()
    ini.read(ROOT / "settings.ini")
    return dict(s.split("=", 1) for s in ini["DEFAULT"]["console_scripts"].split())


def _run_entry_point(entry: str, option: str) -> subprocess.CompletedProcess:
    "Run a console script's entry point with one option in a fresh Python; report torch imports."
    module, func = entry.split(":")
    code = "\n".join([
        "import sys",
        f"from {module} import {func}",
        f"try: {func}([{option!r}])",
        "except SystemExit as e: code = e.code",
        f"loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)",
        "print('HEAVY', loaded, 'EXIT', code)"])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("command", ["vitsd-train", "vitsd-demo", "vitsd-predict"])
@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_and_version_import_no_torch(command, option):
    "The entry points settings.ini installs answer --help and --version before importing torch."
    entry = _console_scripts()[command]
    r = _run_entry_point(entry, option)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("HEAVY [] EXIT 0"), (
        f"{command} {option} ran {entry}, which imported torch before answering "
        f"({r.stdout.split('HEAVY')[-1].strip()}); settings.ini's console_scripts must name "
        "torch-free entry points, such as vitsd_nbdev.cli's train_main, demo_main, predict_main")
    assert command in r.stdout


def test_bad_choice_is_refused_before_torch():
    "A misspelt model is refused by the parser, before the training code (and torch) loads."
    r = _run_entry_point("vitsd_nbdev.cli:train_main", "--model=sl-vit")
    assert "HEAVY [] EXIT 2" in r.stdout, r.stdout
    assert "invalid choice: 'sl-vit'" in r.stderr


def test_cli_module_imports_no_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, vitsd_nbdev.cli; "
                        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_lists_equal_the_library():
    "The torch-free copies equal the registry: TrainConfig's fields, models, presets, recipes, weights."
    import torch
    from vitsd_nbdev.predict import WEIGHTS
    from vitsd_nbdev.training import RECIPES, TrainConfig, model_presets
    from vitsd_nbdev.vit import ADD_ON_MODELS, PRESETS, VARIANTS
    helps = cli.field_help()
    assert cli.TRAIN_FIELDS == [(f.name, f.type, f.default, helps[f.name]) for f in fields(TrainConfig)]
    assert cli.MODEL_PRESETS == model_presets()
    assert list(cli.MODEL_PRESETS) == [*VARIANTS, *ADD_ON_MODELS]
    assert all(cli.MODEL_PRESETS[m] == list(PRESETS) for m in VARIANTS)
    assert cli.RECIPE_NAMES == list(RECIPES)
    assert cli.WEIGHT_NAMES == list(WEIGHTS)
    assert cli.torch_version() == torch.__version__
    choices = cli.option_choices()
    for amp in choices["amp"]: TrainConfig(amp=amp)                 # every choice is accepted
    for device in choices["device"]: TrainConfig(device=device)
    with pytest.raises(ValueError): TrainConfig(amp="fp8")           # and the list is the library's


def test_parsers_defaults_are_the_librarys():
    "No option given: TrainConfig's defaults; vitsd-demo's defaults are demo()'s; vitsd-predict's load_run's."
    from vitsd_nbdev.predict import load_run
    from vitsd_nbdev.training import TrainConfig
    cfg, run = cli.train_options([])
    assert cfg == TrainConfig()
    assert run == dict(resume=False, overwrite=False, extend=False, stop_after=None, progress=True)
    demo = inspect.signature(cli.demo).parameters
    a = cli.demo_parser().parse_args([])
    assert (a.out_dir, a.epochs, a.seed, a.overwrite) == tuple(
        demo[k].default for k in ("out_dir", "epochs", "seed", "overwrite"))
    a = cli.predict_parser().parse_args(["run", "x.png"])
    loaded = inspect.signature(load_run).parameters
    assert (a.weights, a.device) == (loaded["weights"].default, loaded["device"].default)


def test_help_shows_each_field_default_and_comment():
    text = " ".join(cli.train_parser().format_help().split())
    for name, _, default, comment in cli.TRAIN_FIELDS:
        assert "--" + name.replace("_", "-") in text
        assert " ".join(comment.split()) in text, name
        assert f"(default: {'none' if default is None and name == 'preset' else default})" in text, name
