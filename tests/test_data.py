"Data (chapter 6): datasets, statistics, the augmentation recipe, Mixup/CutMix, the loaders and the fast path."
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import v2

from vitsd_nbdev.data import (DATASETS, ERASE_RATIO, ERASE_SCALE, STATS, AugmentConfig, DatasetInfo,
                              FileImages, channel_stats, default_augment, eval_transform, get_dataset,
                              get_loaders, mix_batch, read_image, resize_square, train_transform)
from vitsd_nbdev.fastdata import (DeviceLoader, get_device_loaders, random_crop_batch, random_erasing_batch,
                                  random_flip_batch, to_tensors)

CIFAR = os.environ.get("VITSD_CIFAR10")   # a CIFAR-10 copy as an image folder with train/ and test/, if any
DIGITS_MEAN, DIGITS_STD = STATS["digits"]


def one_line(e):
    return "\n" not in str(e.value) and len(str(e.value)) > 20


# --- datasets -----------------------------------------------------------------------------------------------------

def test_digits_split_values_and_size():
    tr, te = get_dataset("digits"), get_dataset("digits", split="test")
    assert (len(tr), len(te)) == (1437, 360)
    x, y = tr[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 8, 8) and isinstance(y, int)
    assert int(tr.images.max()) == 255 and int(tr.images.min()) == 0
    counts = torch.bincount(te.labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37                # stratified
    assert tr.classes == [str(k) for k in range(10)]
    assert tr.info == DatasetInfo("digits", 10, 1, 8, DIGITS_MEAN, DIGITS_STD)
    # the split is fixed: the same images every time, and train and test are disjoint
    assert torch.equal(get_dataset("digits").images, tr.images)
    flat = lambda d: {tuple(v.flatten().tolist()) for v in d.images}
    assert len(flat(tr) & flat(te)) < 5                                       # (a few digits are pixel-identical)
    up = get_dataset("digits", image_size=16)
    assert up.images.shape == (1437, 1, 16, 16) and up.info.image_size == 16


def test_digits_file_is_scikit_learns_digits():
    from vitsd_nbdev.data import digits_arrays
    images, labels = digits_arrays()
    assert images.dtype == labels.dtype == np.uint8 and images.shape == (1797, 8, 8)
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    assert np.array_equal(images, d.images) and np.array_equal(labels, d.target)


def test_stratified_split_rule():
    from vitsd_nbdev.data import stratified_split
    rs = np.random.RandomState(0)
    for seed in range(30):
        labels = rs.choice(["a", "b", "c", "d"], size=rs.randint(20, 200), p=[0.1, 0.2, 0.3, 0.4])
        labels[:8] = list("aabbccdd")                                        # every class has 2
        f = rs.choice([0.1, 0.2, 0.25, 0.5])
        keep, held = stratified_split(labels, f, seed)
        assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(labels)))
        assert len(held) == int(np.ceil(f * len(labels)))
        for c in "abcd":                                                     # each class within 1 of its share
            assert abs((labels[held] == c).sum() - f * (labels == c).sum()) < 1 + 1e-9
        assert all(np.array_equal(a, b) for a, b in zip(stratified_split(labels, f, seed), (keep, held)))
        assert all(np.all(np.diff(p) > 0) for p in (keep, held))            # sorted
    with pytest.raises(ValueError, match="class 'z' has 1 item") as e:
        stratified_split(["y", "y", "z"], 0.5)
    assert one_line(e)
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_split([0, 0, 1, 1], 0.0)
    with pytest.raises(ValueError, match="at least the number of classes, 3"):
        stratified_split([0, 0, 1, 1, 2, 2], 0.2)


def test_stratified_split_equals_scikit_learns():
    from vitsd_nbdev.data import digits_arrays, stratified_split
    ms = pytest.importorskip("sklearn.model_selection")
    rs = np.random.RandomState(1)
    cases = [(digits_arrays()[1], 0.2, 0)]                                  # the digits split itself
    while len(cases) < 151:                                               # the digits and 150 random sets
        k = rs.randint(2, 12)
        y = rs.randint(0, k, rs.randint(3 * k, 300))
        if np.bincount(y, minlength=k).min() >= 2: cases.append((y, rs.choice([0.1, 0.15, 0.2, 0.3, 0.5]), len(cases)))
    for y, f, seed in cases:
        try:
            theirs = ms.train_test_split(np.arange(len(y)), test_size=f, stratify=y, random_state=seed)
        except ValueError:
            with pytest.raises(ValueError):
                stratified_split(y, f, seed)
            continue
        ours = stratified_split(y, f, seed)
        assert all(np.array_equal(a, np.sort(b)) for a, b in zip(ours, theirs)), (f, seed)


def test_digits_stats_table_is_recomputed():
    mean, std = channel_stats(get_dataset("digits"))
    assert abs(mean[0] - DIGITS_MEAN[0]) < 5e-5 and abs(std[0] - DIGITS_STD[0]) < 5e-5


def test_channel_stats_equals_naive():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (300, 3, 5, 7), dtype=torch.uint8)
    mean, std = channel_stats(x)
    f = x.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), f.mean((0, 2, 3)), atol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), f.std((0, 2, 3), correction=0), atol=1e-12)
    with pytest.raises(ValueError):
        channel_stats(x.float())


def test_bad_names_and_splits_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="valid names: digits, cifar10, cifar100, svhn, tiny_imagenet") as e:
        get_dataset("mnist")
    assert one_line(e)
    with pytest.raises(ValueError, match="splits train, test"):
        get_dataset("digits", split="val")
    with pytest.raises(ValueError, match="positive"):
        get_dataset("digits", image_size=0)
    assert "imagefolder:<path>" in DATASETS


@pytest.mark.parametrize("name,missing", [("cifar10", "data_batch_1"), ("cifar100", "meta"), ("svhn", "train_32x32.mat")])
def test_missing_torchvision_files_say_what_and_where(tmp_path, name, missing):
    with pytest.raises(FileNotFoundError) as e:
        get_dataset(name, root=tmp_path)
    assert one_line(e) and missing in str(e.value) and str(tmp_path) in str(e.value) and "download=True" in str(e.value)


def make_tiny_imagenet(root, wnids=("n02", "n01", "n03"), n_train=3, n_val=6):
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    k_of = {w: k for k, w in enumerate(sorted(wnids))}
    for w in wnids:
        (base / "train" / w / "images").mkdir(parents=True)
        for i in range(n_train):
            v = 50 + 70 * k_of[w]
            img = Image.new("L", (64, 64), v) if i == 0 else Image.new("RGB", (64, 64), (v, v, v))
            img.save(base / "train" / w / "images" / f"{w}_{i}.JPEG")
    rows = []
    for i in range(n_val):
        w = wnids[(i * i) % len(wnids)]
        Image.new("RGB", (64, 64), (50 + 70 * k_of[w],) * 3).save(base / "val" / "images" / f"val_{i}.JPEG")
        rows.append(f"val_{i}.JPEG\t{w}\t1\t2\t30\t40")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def test_tiny_imagenet_layout(tmp_path):
    make_tiny_imagenet(tmp_path)
    tr = get_dataset("tiny_imagenet", root=tmp_path)
    te = get_dataset("tiny_imagenet", root=tmp_path, split="test")
    assert tr.classes == ["n01", "n02", "n03"] and (len(tr), len(te)) == (9, 6)
    assert tr.info.num_classes == 3 and tr.info.in_chans == 3 and tr.info.image_size == 64
    for d in (tr, te):
        for i in range(len(d)):
            img, y = d[i]
            assert img.shape == (3, 64, 64) and img.dtype == torch.uint8     # grayscale files become RGB
            assert abs(img.float().mean().item() - (50 + 70 * y)) < 3         # label agrees with the pixels
    # validation labels come from val_annotations.txt, not from folders
    assert te.labels.tolist() == [1, 0, 0, 1, 0, 0]
    assert get_dataset("tiny_imagenet", root=tmp_path, split="val").labels.tolist() == te.labels.tolist()
    assert get_dataset("tiny_imagenet", root=tmp_path, image_size=32)[0][0].shape == (3, 32, 32)


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing wnids.txt, train, val/images, val/val_annotations.txt") as e:
        get_dataset("tiny_imagenet", root=tmp_path)
    assert one_line(e) and "download=True" in str(e.value)


def make_folder(root, classes=("cat", "dog", "owl"), n=10, gray=False, size=20, ext="png", vary=False):
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mode = "L" if gray or i % 3 == 0 else "RGB"
            w = size + (i % 2) * 6 if vary else size
            v = 40 + 80 * k
            Image.new(mode, (w, size), v if mode == "L" else (v, v, v)).save(root / c / f"{i:03d}.{ext}")


def test_imagefolder_without_split_folders_makes_fixed_stratified_split(tmp_path):
    make_folder(tmp_path / "ds", gray=True, vary=True)
    name = f"imagefolder:{tmp_path / 'ds'}"
    tr, te = get_dataset(name, image_size=16), get_dataset(name, split="test", image_size=16)
    assert (len(tr), len(te)) == (24, 6) and sorted(te.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert not set(tr.files) & set(te.files)
    assert te.files == get_dataset(name, split="test", image_size=16).files            # fixed
    assert tr.in_chans == 1 and tr[0][0].shape == (1, 16, 16)
    for i in range(len(te)):
        img, y = te[i]
        assert int(img[0, 8, 8]) == 40 + 80 * y
    assert get_dataset(name).image_size is None                                          # sizes differ
    with pytest.raises(ValueError, match="'train' and 'test'"):
        get_dataset(name, split="val")


def test_imagefolder_with_split_folders_rgb_and_errors(tmp_path):
    make_folder(tmp_path / "ds" / "train", n=4, ext="jpg", size=24)
    make_folder(tmp_path / "ds" / "test", classes=("cat", "owl"), n=2, ext="jpg", size=24)
    name = f"imagefolder:{tmp_path / 'ds'}"
    te = get_dataset(name, split="test")
    assert te.classes == ["cat", "dog", "owl"] and sorted(set(te.labels.tolist())) == [0, 2]   # labels of train's classes
    assert te.in_chans == 3 and te.image_size == 24 and te[0][0].shape == (3, 24, 24)
    with pytest.raises(ValueError, match=r"split folders \['test', 'train'\]"):
        get_dataset(name, split="valid")
    make_folder(tmp_path / "ds" / "test", classes=("zebra",), n=1, ext="jpg")
    with pytest.raises(ValueError, match="zebra"):
        get_dataset(name, split="test")
    with pytest.raises(FileNotFoundError, match="no folder"):
        get_dataset(f"imagefolder:{tmp_path / 'nope'}")


def test_imagefolder_too_small_to_split(tmp_path):
    make_folder(tmp_path / "ds", n=1)
    with pytest.raises(ValueError, match="cannot split") as e:
        get_dataset(f"imagefolder:{tmp_path / 'ds'}")
    assert one_line(e)


def test_file_of_another_size_is_refused(tmp_path):
    make_folder(tmp_path / "ds", classes=("a",), n=2, vary=True)
    ds = FileImages("x", "train", ["a"], sorted((tmp_path / "ds" / "a").iterdir()), [0, 0], 1, image_size=20)
    assert ds[0][0].shape == (1, 20, 20)
    with pytest.raises(ValueError, match="pass image_size="):
        ds[1]
    with pytest.raises(ValueError, match="pass image_size=") as e:                   # from a loader worker
        to_tensors(ds, cache=False, num_workers=1)
    assert one_line(e) and "001.png" in str(e.value)


def test_resize_square_shorter_side_then_centre_crop():
    x = torch.zeros(1, 20, 40, dtype=torch.uint8)
    x[:, :, 6:34] = 200                                           # a bright band, a bit wider than the centre square
    y = resize_square(x, 10)
    assert y.shape == (1, 10, 10) and int(y.min()) == 200        # the centre crop keeps only the band
    assert resize_square(y, 10) is y


@pytest.mark.skipif(not CIFAR or not Path(CIFAR).is_dir(), reason="VITSD_CIFAR10 names no CIFAR-10 folder")
def test_cifar10_copy_as_imagefolder():
    name = f"imagefolder:{CIFAR}"
    tr, te = get_dataset(name), get_dataset(name, split="test")
    assert (len(tr), len(te)) == (50000, 10000)
    assert tr.classes[:3] == ["airplane", "automobile", "bird"] and tr.info.num_classes == 10
    assert torch.bincount(tr.labels).tolist() == [5000] * 10 and torch.bincount(te.labels).tolist() == [1000] * 10
    assert tr.info.in_chans == 3 and tr.info.image_size == 32 and tr[0][0].dtype == torch.uint8
    sub = torch.stack([te[i][0] for i in range(0, 10000, 10)])
    mean, std = channel_stats(sub)                                # close to the README's training-set values
    assert all(abs(a - b) < 0.02 for a, b in zip(mean, (0.4913, 0.4821, 0.4465)))
    assert all(abs(a - b) < 0.02 for a, b in zip(std, (0.2452, 0.2428, 0.2606)))


# --- augmentation -------------------------------------------------------------------------------------------------

def names(t):
    return [type(o).__name__ for o in t.transforms]


def test_default_recipes():
    assert default_augment("cifar10") == AugmentConfig()
    assert default_augment("cifar100").autoaugment == "cifar10"
    svhn = default_augment("svhn")
    assert svhn.flip is False and svhn.autoaugment == "svhn"
    assert default_augment("tiny_imagenet").autoaugment == "imagenet"
    d = default_augment("digits", 16)
    assert (d.crop_padding, d.flip, d.autoaugment, d.mixes, d.random_erasing) == (2, False, None, False, 0.0)
    assert default_augment("digits").crop_padding == 1
    assert default_augment("imagefolder:x", 64).crop_padding == 8
    with pytest.raises(ValueError, match="valid names"):
        default_augment("mnist")
    with pytest.raises(ValueError, match="cifar10, svhn, imagenet"):
        AugmentConfig(autoaugment="cifar")
    with pytest.raises(ValueError, match="between 0 and 1"):
        AugmentConfig(random_erasing=1.5)


@pytest.mark.parametrize("field,off,op", [("crop_padding", 0, "RandomCrop"), ("flip", False, "RandomHorizontalFlip"),
                                          ("autoaugment", None, "AutoAugment"), ("random_erasing", 0.0, "RandomErasing")])
def test_each_switch_removes_exactly_its_op(field, off, op):
    full = names(train_transform(32, *STATS["cifar10"]))
    assert full == ["RandomCrop", "RandomHorizontalFlip", "AutoAugment", "ToDtype", "Normalize", "RandomErasing"]
    fewer = names(train_transform(32, *STATS["cifar10"], replace(AugmentConfig(), **{field: off})))
    assert op not in fewer and len(fewer) == len(full) - 1
    assert names(train_transform(32, *STATS["cifar10"], AugmentConfig.off())) == ["ToDtype", "Normalize"]


def test_transforms_shapes_and_normalisation():
    torch.manual_seed(0)
    rgb = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = train_transform(32, *STATS["cifar10"])(rgb)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    gray = get_dataset("digits")[0][0]
    out = train_transform(8, DIGITS_MEAN, DIGITS_STD, replace(AugmentConfig(), autoaugment="svhn", flip=False))(gray)
    assert out.shape == (1, 8, 8) and out.dtype == torch.float32
    ev = eval_transform(*STATS["cifar10"])(rgb)
    m, s = torch.tensor(STATS["cifar10"][0])[:, None, None], torch.tensor(STATS["cifar10"][1])[:, None, None]
    assert torch.allclose(ev, (rgb / 255 - m) / s, atol=1e-6)


def test_mix_batch_soft_targets():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    n_mixed = 0
    for _ in range(100):
        xm, ym = mix_batch(x, y, 10)
        assert ym.shape == (32, 10) and ym.dtype == torch.float32
        assert torch.allclose(ym.sum(1), torch.ones(32), atol=1e-5)
        if torch.equal(xm, x):
            assert torch.equal(ym, F.one_hot(y, 10).float())                 # unmixed: one-hot
        else:
            n_mixed += 1
            assert (ym.max(1).values < 1).all() or (ym.max(1).values == 1).sum() < 32   # mixed: soft
    assert 30 < n_mixed < 70                                                  # half of the batches
    for _ in range(10):
        xm, ym = mix_batch(x, y, 10, replace(AugmentConfig(), mix_prob=0.0))
        assert torch.equal(xm, x) and torch.equal(ym, F.one_hot(y, 10).float())
    only_mixup = replace(AugmentConfig(), mix_prob=1.0, cutmix_alpha=0.0)
    only_cutmix = replace(AugmentConfig(), mix_prob=1.0, mixup_alpha=0.0)
    assert all(not (mix_batch(x, y, 10, only_mixup)[0] == x).any() for _ in range(10))   # Mixup changes every pixel
    assert all((mix_batch(x, y, 10, only_cutmix)[0] == x).any() for _ in range(10))      # CutMix keeps some
    assert not AugmentConfig(mixup_alpha=0.0, cutmix_alpha=0.0).mixes


def test_label_smoothing_on_soft_targets_equals_official_mixup_loss():
    torch.manual_seed(1)
    logits, a, b, lam = torch.randn(16, 7), torch.randint(0, 7, (16,)), torch.randint(0, 7, (16,)), 0.35
    soft = lam * F.one_hot(a, 7).float() + (1 - lam) * F.one_hot(b, 7).float()
    official = lam * F.cross_entropy(logits, a, label_smoothing=0.1) + (1 - lam) * F.cross_entropy(logits, b, label_smoothing=0.1)
    assert torch.allclose(F.cross_entropy(logits, soft, label_smoothing=0.1), official, atol=1e-6)


def test_get_loaders_digits():
    tr, te, info = get_loaders("digits", batch_size=64, image_size=16, num_workers=0)
    x, y = next(iter(tr))
    assert (x.shape, x.dtype, y.shape, y.dtype) == ((64, 1, 16, 16), torch.float32, (64,), torch.int64)
    assert (len(tr), len(te)) == (1437 // 64, 6) and info.mean == DIGITS_MEAN
    xt, yt = next(iter(te))
    assert torch.equal(yt, get_dataset("digits", split="test").labels[:64])
    assert abs(xt.mean().item()) < 0.3                                        # normalised
    # the paper's recipe (mixing) through a worker process: the collate_fn must pickle
    tr, _, _ = get_loaders("digits", batch_size=32, num_workers=1, augment=replace(AugmentConfig(), autoaugment="svhn", mix_prob=1.0))
    x, y = next(iter(tr))
    assert y.shape == (32, 10) and torch.allclose(y.sum(1), torch.ones(32))


# --- fast path ----------------------------------------------------------------------------------------------------

def test_to_tensors_cache(tmp_path):
    make_folder(tmp_path / "ds", n=5, size=12)
    ds = get_dataset(f"imagefolder:{tmp_path / 'ds'}")
    cache = tmp_path / "cache"
    x, y = to_tensors(ds, cache_dir=cache)
    assert x.dtype == torch.uint8 and x.shape == (len(ds), 3, 12, 12)
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(len(ds))])) and torch.equal(y, ds.labels)
    files = list(cache.iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".")             # no temporary file left
    x2, _ = to_tensors(ds, cache_dir=cache)
    assert torch.equal(x2, x)
    # a changed file changes the fingerprint: decoded again, into a new cache file
    Image.new("RGB", (12, 12), (1, 2, 3)).save(tmp_path / "ds" / "cat" / "000.png")
    ds2 = get_dataset(f"imagefolder:{tmp_path / 'ds'}")
    x3, _ = to_tensors(ds2, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2 and not torch.equal(x3, x)
    to_tensors(ds2, cache_dir=tmp_path / "none", cache=False)
    assert not (tmp_path / "none").exists()
    digits = get_dataset("digits")
    assert to_tensors(digits)[0] is digits.images


def test_random_crop_batch_per_sample_and_equal_to_naive():
    x = get_dataset("digits", image_size=16).images[:40]
    torch.manual_seed(3)
    fast = random_crop_batch(x, 3)
    torch.manual_seed(3)
    dy, dx = torch.randint(0, 7, (2, 40))
    naive = torch.stack([TF.crop(TF.pad(img, [3]), int(a), int(b), 16, 16) for img, a, b in zip(x, dy, dx)])
    assert torch.equal(fast, naive)
    same = torch.full((40, 1, 8, 8), 9, dtype=torch.uint8)
    assert len({tuple(c.flatten().tolist()) for c in random_crop_batch(same, 2)}) > 10   # crops differ within a batch
    assert torch.equal(random_crop_batch(x, 0), x)


def test_random_flip_batch_per_sample():
    torch.manual_seed(0)
    x = torch.arange(4.).expand(100, 1, 2, 4)
    out = random_flip_batch(x)
    flipped = out[:, 0, 0, 0] == 3
    assert 25 < int(flipped.sum()) < 75
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])


def test_random_erasing_batch_like_torchvision():
    torch.manual_seed(0)
    ones = torch.ones(3000, 1, 16, 16)
    ours = random_erasing_batch(ones, 0.5)[:, 0] == 0
    tv = v2.RandomErasing(0.5, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=0)
    theirs = torch.stack([tv(img) for img in ones])[:, 0] == 0
    def stats(m):
        hit = m.flatten(1).any(1)
        return hit.float().mean().item(), m.flatten(1)[hit].float().mean(1).mean().item()
    (p1, a1), (p2, a2) = stats(ours), stats(theirs)
    assert abs(p1 - p2) < 0.05 and abs(a1 - a2) < 0.02
    assert 0.1 < a1 < 0.3                                                     # areas drawn from [0.02, 0.4]
    assert torch.equal(random_erasing_batch(ones[:10], 0.0), ones[:10])
    # each erased region is one axis-aligned rectangle
    m = ours[ours.flatten(1).any(1)][0]
    rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
    assert m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


@pytest.fixture(scope="module")
def digits16():
    d = get_dataset("digits", image_size=16)
    return d.images, d.labels


def test_device_loader_is_deterministic_per_seed_and_epoch(digits16):
    x, y = digits16
    cfg = replace(AugmentConfig(), flip=False, autoaugment="svhn")
    make = lambda: DeviceLoader(x[:192], y[:192], 64, DIGITS_MEAN, DIGITS_STD, cfg, 10, shuffle=True, drop_last=True, seed=11)
    def run(loader, epoch):
        loader.set_epoch(epoch)
        return list(loader)
    a, b = run(make(), 2), run(make(), 2)                                     # a fresh loader, as after a resume
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert ya.shape == (64, 10) and xa.dtype == torch.float32
    c = run(make(), 3)
    assert not torch.equal(a[0][0], c[0][0])
    torch.manual_seed(5); r1 = torch.rand(4)
    torch.manual_seed(5); list(make()); r2 = torch.rand(4)
    assert torch.equal(r1, r2)                                                # the caller's RNG is untouched


def test_device_loader_per_sample_crops_differ_within_batch():
    same = torch.full((64, 1, 8, 8), 200, dtype=torch.uint8)
    loader = DeviceLoader(same, torch.zeros(64, dtype=torch.long), 64, (0.5,), (0.25,), AugmentConfig(crop_padding=2, flip=False, autoaugment=None, random_erasing=0, mix_prob=0))
    xb, _ = next(iter(loader))
    assert len({tuple(img.flatten().tolist()) for img in xb}) > 10


@pytest.mark.parametrize("drop_last", [False, True])
def test_device_loader_shards_like_distributed_sampler(digits16, drop_last):
    x, _ = digits16
    ids = torch.arange(len(x))
    got = []
    for rank in range(2):
        L = DeviceLoader(x, ids, 100, DIGITS_MEAN, DIGITS_STD, shuffle=True, seed=4, rank=rank, world_size=2, drop_last=drop_last)
        L.set_epoch(9)
        s = DistributedSampler(range(len(x)), num_replicas=2, rank=rank, shuffle=True, seed=4, drop_last=drop_last)
        s.set_epoch(9)
        assert L.indices().tolist() == list(s)
        got.append(torch.cat([yb for _, yb in L]).tolist())
    assert len(got[0]) == len(got[1])
    if drop_last:
        assert not set(got[0]) & set(got[1])                                  # a partition of (most of) the epoch
    else:
        assert set(got[0]) | set(got[1]) == set(range(len(x)))               # everything, one index padded
        assert len(got[0]) + len(got[1]) == len(x) + 1


def test_device_loader_partition_even():
    x = torch.zeros(40, 1, 4, 4, dtype=torch.uint8)
    shards = []
    for rank in range(2):
        L = DeviceLoader(x, torch.arange(40), 8, (0.,), (1.,), shuffle=True, rank=rank, world_size=2)
        shards.append([int(v) for _, yb in L for v in yb])
    assert sorted(shards[0] + shards[1]) == list(range(40)) and len(shards[0]) == 20


def test_device_loader_eval_equals_eval_transform_and_errors(digits16):
    x, y = digits16
    L = DeviceLoader(x, y, 500, DIGITS_MEAN, DIGITS_STD)
    assert len(L) == 3
    xb, yb = next(iter(L))
    ev = eval_transform(DIGITS_MEAN, DIGITS_STD)
    assert torch.allclose(xb, torch.stack([ev(img) for img in x[:500]]), atol=1e-6) and torch.equal(yb, y[:500])
    assert sum(len(b[1]) for b in L) == len(x)
    with pytest.raises(ValueError, match="num_classes"):
        DeviceLoader(x, y, 8, DIGITS_MEAN, DIGITS_STD, AugmentConfig())
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(x.float(), y, 8, DIGITS_MEAN, DIGITS_STD)
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(x, y, 8, DIGITS_MEAN, DIGITS_STD, rank=2, world_size=2)


def test_get_device_loaders(tmp_path):
    tr, te, info = get_device_loaders("digits", image_size=16, batch_size=100)
    assert info == DatasetInfo("digits", 10, 1, 16, DIGITS_MEAN, DIGITS_STD)
    xb, yb = next(iter(tr))
    assert xb.shape == (100, 1, 16, 16) and yb.dtype == torch.int64 and len(tr) == 14 and len(te) == 4
    make_folder(tmp_path / "ds", n=5, size=12)
    tr, te, info = get_device_loaders(f"imagefolder:{tmp_path / 'ds'}", batch_size=4, cache_dir=tmp_path / "c", num_workers=0)
    assert info.mean is not None and len(info.mean) == 3 and info.num_classes == 3
    xb, yb = next(iter(tr))
    assert xb.shape == (4, 3, 12, 12) and yb.shape == (4, 3)                 # the folder recipe mixes: soft targets


# --- bad input: files, folders, names, sizes (each one line, as early as possible) ------------------------------------

def write_bad_files(folder):
    "A truncated JPEG and a text file named .png in folder/."
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[:len(data) // 2])
    (folder / "notes.png").write_text("not an image\n")
    return folder / "cut.jpg", folder / "notes.png"


def test_bad_image_files_are_named_in_one_line(tmp_path):
    cut, text = write_bad_files(tmp_path / "bad")
    for f in (cut, text):
        with pytest.raises(ValueError, match="cannot decode") as e:
            FileImages("x", "train", ["a"], [f], [0], 3, 20)[0]
        assert one_line(e) and str(f) in str(e.value)
    for workers in (0, 1):                                                   # in a loader worker too
        ds = FileImages("x", "train", ["a"], [tmp_path / "bad" / "full.jpg", cut], [0, 0], 3, 20)
        with pytest.raises(ValueError, match="cannot decode") as e:
            to_tensors(ds, cache=False, num_workers=workers)
        assert one_line(e) and str(cut) in str(e.value)
    make_folder(tmp_path / "ds")
    first = get_dataset(f"imagefolder:{tmp_path / 'ds'}").files[0]
    Path(first).write_text("not an image\n")                               # found while probing the folder
    with pytest.raises(ValueError, match="cannot decode") as e:
        get_dataset(f"imagefolder:{tmp_path / 'ds'}")
    assert one_line(e) and first in str(e.value)


def test_bad_image_file_through_the_cli(tmp_path, capsys):
    from vitsd_nbdev.cli import train_main
    make_folder(tmp_path / "ds", classes=("a", "b"), n=10)
    cut, _ = write_bad_files(tmp_path / "bad")
    os.replace(cut, tmp_path / "ds" / "b" / "009.jpg")
    with pytest.raises(SystemExit) as e:
        train_main(["--dataset", f"imagefolder:{tmp_path / 'ds'}", "--out-dir", str(tmp_path / "run"),
                    "--epochs", "1", "--warmup-epochs", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "009.jpg" in err and "Traceback" not in err


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    levels = np.arange(256, dtype=np.uint16)
    a = (levels * 257).reshape(16, 16)                                       # 0..65535: level k is 257 k
    a[0, 1], a[0, 2] = 128, 129                                              # round(128/257) = 0, round(129/257) = 1
    for c in ("a", "b"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(a).save(tmp_path / "ds" / c / f"{i}.png")
    f = tmp_path / "ds" / "a" / "0.png"
    with Image.open(f) as im:
        assert im.mode.startswith("I")                                       # Pillow reads it as 16-bit
    expected = torch.from_numpy(levels.astype(np.uint8).reshape(16, 16))
    expected[0, 1], expected[0, 2] = 0, 1
    assert torch.equal(read_image(f, 1)[0], expected)
    assert torch.equal(read_image(f, 3), expected.expand(3, 16, 16))
    ds = get_dataset(f"imagefolder:{tmp_path / 'ds'}")
    assert ds.in_chans == 1 and torch.equal(ds[0][0][0], expected)


def test_one_class_folder_is_refused(tmp_path):
    make_folder(tmp_path / "flat", classes=("cat",), n=10)
    make_folder(tmp_path / "split" / "train", classes=("cat",), n=8)
    make_folder(tmp_path / "split" / "test", classes=("cat",), n=2)
    for name in ("flat", "split"):
        with pytest.raises(ValueError, match="one class folder, 'cat'") as e:
            get_dataset(f"imagefolder:{tmp_path / name}")
        assert one_line(e)


@pytest.mark.parametrize("name", ["imagefolder:", "imagefolder:  "])
def test_empty_imagefolder_path_is_refused(tmp_path, monkeypatch, capsys, name):
    from vitsd_nbdev.cli import train_main
    make_folder(tmp_path / "cwd" / "runs", classes=("a", "b"), n=5)          # a folder that would pass as classes
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(ValueError, match="names no folder") as e:
        get_dataset(name)
    assert one_line(e)
    with pytest.raises(SystemExit) as e:
        train_main(["--dataset", name, "--out-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "imagefolder:<path>" in err


def test_split_smaller_than_a_batch_still_has_one_batch(tmp_path):
    x, y = torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10)
    L = DeviceLoader(x, y, 64, (0.,), (1.,), shuffle=True, drop_last=True)
    assert len(L) == 1 and [len(b[1]) for b in L] == [10]
    L = DeviceLoader(torch.zeros(130, 1, 4, 4, dtype=torch.uint8), torch.arange(130), 64, (0.,), (1.,), drop_last=True)
    assert [len(b[1]) for b in L] == [64, 64]                                # the rest is still dropped
    tr, _, _ = get_device_loaders("digits", batch_size=2000)
    assert len(tr) == 1 and len(next(iter(tr))[1]) == 1437
    make_folder(tmp_path / "ds", n=5, size=12)
    tr, _, _ = get_loaders(f"imagefolder:{tmp_path / 'ds'}", batch_size=128, num_workers=0)
    assert len(tr) == 1 and len(next(iter(tr))[1]) == 12


def test_importing_data_does_not_import_torchvision():
    "torchvision (its transforms pull in torchvision.models: about a second) is imported where used, not by `import`."
    code = ("import sys, vitsd_nbdev.data\n"
            "print(sorted(m for m in sys.modules if m.startswith('torchvision')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"import vitsd_nbdev.data imported {r.stdout.strip()}"


def test_names_moved_to_the_appendix_are_importable_from_data():
    import vitsd_nbdev.data as data
    import vitsd_nbdev.runs as runs
    for name in ("FileImages", "ImageFileError", "read_image", "get_loaders", "MixCollate", "TINY_IMAGENET_URL"):
        assert getattr(data, name) is getattr(runs, name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        data.nothing_here
