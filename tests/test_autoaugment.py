"Batched AutoAugment (chapter 6a): torchvision's bytes per operation, its distribution per policy."
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy import stats
from torchvision.transforms import v2

from vitsd_nbdev.autoaugment import OPS, BatchAutoAugment, apply_op, magnitudes


def images(C, H=32, W=32, n=16):
    g = torch.Generator().manual_seed(C)
    noise = torch.randint(0, 256, (n, C, H, W), generator=g, dtype=torch.uint8)
    smooth = TF.resize(torch.randint(0, 256, (n, C, 4, 4), generator=g, dtype=torch.uint8), [H, W])
    return torch.cat([noise, smooth])


@pytest.mark.parametrize("C,H,W", [(3, 32, 32), (1, 32, 32), (3, 16, 24), (3, 24, 40)])
@pytest.mark.parametrize("op", OPS)
def test_each_operation_gives_torchvisions_bytes(op, C, H, W):
    x = images(C, H, W)
    tv = v2.AutoAugment()
    bins, signed = magnitudes(op, H, W)
    values = [0.0] if bins is None else [float(bins[k]) * s for k in (1, 2, 5, 6, 9)
                                         for s in (1, -1)[:1 + signed]]
    for v in values:
        ref = torch.stack([tv._apply_image_or_video_transform(img, op, v, "nearest", tv._fill)
                           for img in x])
        mags = torch.full((len(x),), v, dtype=torch.float64)
        assert torch.equal(apply_op(x, op, mags), ref), (op, v)


def test_each_image_gets_its_own_magnitude():
    x = images(3)[:4]
    m = torch.tensor([-0.9, 0.0, 0.3, 0.9], dtype=torch.float64)
    got = apply_op(x, "Brightness", m)
    for i in range(4): assert torch.equal(got[i], TF.adjust_brightness(x[i], 1.0 + float(m[i])))


def test_grayscale_policy_has_torchvisions_distribution():
    # a smooth grayscale image, as digits are
    img = images(1)[-1]
    n = 2000
    torch.manual_seed(3)
    tv = v2.AutoAugment(v2.AutoAugmentPolicy.SVHN)
    theirs = [tv(img).numpy().tobytes() for _ in range(n)]
    torch.manual_seed(4)
    ours = [o.numpy().tobytes() for o in BatchAutoAugment("svhn")(img.expand(n, -1, -1, -1))]
    keys = sorted(set(theirs) | set(ours))
    table = np.array([[s.count(k) for k in keys] for s in (theirs, ours)])
    rare = table.sum(0) < 10
    table = np.column_stack([table[:, ~rare], table[:, rare].sum(1)])
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_seeded_batches_repeat_and_input_is_left_alone():
    x = images(3)
    before = x.clone()
    aa = BatchAutoAugment("imagenet")
    torch.manual_seed(0); a = aa(x)
    torch.manual_seed(0); b = aa(x)
    assert torch.equal(a, b) and torch.equal(x, before) and not torch.equal(a, x)


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match="uint8 image batches") as e:
        BatchAutoAugment()(torch.rand(2, 3, 8, 8))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cifar10, svhn"): BatchAutoAugment("mnist")
