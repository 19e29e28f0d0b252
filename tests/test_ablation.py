"""experiments/ablation.py: what a user sees before a long run (listing, data errors, subset)."""
import importlib.util, re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("ablation", ROOT / "experiments" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def test_list_counts_the_suite(tmp_path, capsys):
    (tmp_path / "cifar10_small").mkdir()
    (tmp_path / "cifar10_small" / "vit_seed1.json").write_text("{}")
    ablation.main(["--suite", "cifar10_small", "--list", "--results", str(tmp_path)])
    # 7 models x 3 seeds
    assert capsys.readouterr().out.strip() == "cifar10_small: 1 of 21 runs done"


def test_cifar_suite_without_data_says_which_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        ablation.main(["--suite", "cifar10_sweep", "--results", str(tmp_path / "r")])
    assert "--download (torchvision) or --cifar10 FOLDER" in capsys.readouterr().err


def fake_cifar(root, n=3):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_subset_is_class_balanced_and_fixed(tmp_path):
    src = fake_cifar(tmp_path / "cifar")
    info = ablation.subset_from_folder(src, tmp_path / "sub", per_class=2, seed=0)
    files = sorted(p.relative_to(tmp_path / "sub" / "train").as_posix()
                   for p in (tmp_path / "sub" / "train").rglob("*.png"))
    assert info["n_train"] == 4 and [f.split("/")[0] for f in files] == ["cat"] * 2 + ["dog"] * 2
    assert (tmp_path / "sub" / "test").is_symlink()
    again = ablation.subset_from_folder(src, tmp_path / "sub2", per_class=2, seed=0)
    assert again["files_sha1"] == info["files_sha1"]                    # the seed fixes the subset
    other = ablation.subset_from_folder(src, tmp_path / "sub3", per_class=2, seed=3)
    assert other["files_sha1"] != info["files_sha1"]


def test_subset_from_a_wrong_folder_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"no CIFAR-10 ImageFolder at .*check --cifar10"):
        ablation.subset_from_folder(tmp_path, tmp_path / "sub")


def test_results_record_the_commit():
    assert re.fullmatch(r"[0-9a-f]{40}", ablation.git_commit() or "no git")
