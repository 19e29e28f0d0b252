"ViT and SL-ViT (chapter 5): variants, sizes against the paper, gradients, bad input."
import pytest
import torch

from vitsd_nbdev.lsa import SelfAttention
from vitsd_nbdev.spt import ShiftedPatchTokenization
from vitsd_nbdev.patches import PatchTokenization
from vitsd_nbdev.vit import PRESETS, VARIANTS, ViTConfig, count_flops, count_params, create_model

PAPER_TINY_IMAGENET = {"vit": (2.757e6, 189.8e6), "sl_vit": (2.906e6, 199.2e6)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_structure_and_shapes(name):
    m = create_model(name, num_classes=7, image_size=16, preset="tiny")
    v = VARIANTS[name]
    spt, lsa = v["spt"], v.get("lsa", False)
    mask, learned = v.get("diag_mask", lsa), v.get("learned_temperature", lsa)
    assert isinstance(m.embed.tokenizer, ShiftedPatchTokenization if spt else PatchTokenization)
    for b in m.blocks:
        assert isinstance(b.attn, SelfAttention) and b.attn.diag_mask == mask
        assert (b.attn.temperature is not None and b.attn.temperature.scale.requires_grad) == learned
    assert m(torch.randn(3, 3, 16, 16)).shape == (3, 7)


@pytest.mark.parametrize("name", list(PAPER_TINY_IMAGENET))
def test_params_and_flops_match_the_paper(name):
    m = create_model(name, num_classes=200, image_size=64)
    p_ref, f_ref = PAPER_TINY_IMAGENET[name]
    assert count_params(m) == {"vit": 2_756_744, "sl_vit": 2_906_228}[name]   # exact: the official code's count
    assert abs(count_flops(m, 64) / f_ref - 1) < 0.03


def test_flops_count_attention():
    # without the fused-kernel formula attention would count as zero: compare two depths' difference per block
    m1 = create_model("vit", image_size=32, depth=1)
    m2 = create_model("vit", image_size=32, depth=2)
    per_block = count_flops(m2, 32) - count_flops(m1, 32)
    n, d, h, dk, mlp = 65, 192, 12, 16, 384
    expected = n * d * 3 * h * dk + 2 * h * n * n * dk + n * h * dk * d + 2 * n * d * mlp
    assert per_block == expected


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_parameter_gets_a_gradient(name):
    m = create_model(name, num_classes=5, image_size=16, preset="tiny")
    loss = torch.nn.functional.cross_entropy(m(torch.randn(4, 3, 16, 16)), torch.arange(4))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_attention_maps_shapes_and_lsa_diagonal():
    x = torch.randn(2, 3, 16, 16)
    for name in ("vit", "sl_vit"):
        m = create_model(name, image_size=16, preset="tiny").eval()
        maps = m.attention_maps(x)
        assert len(maps) == m.config.depth
        for w in maps:
            assert w.shape == (2, m.config.heads, 65, 65)
            torch.testing.assert_close(w.sum(-1), torch.ones(2, m.config.heads, 65))
            diag = w.diagonal(dim1=-2, dim2=-1)
            assert (diag == 0).all() if name == "sl_vit" else (diag > 0).all()


def test_presets_and_bad_configs():
    assert ViTConfig.from_preset("cifar").patch_size == 4
    assert ViTConfig.from_preset("tiny_imagenet").patch_size == 8
    assert set(PRESETS) >= {"cifar", "tiny_imagenet", "tiny"}
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet")
    with pytest.raises(ValueError, match="unknown preset"):
        create_model("vit", preset="huge")
    with pytest.raises(ValueError, match="does not divide"):
        create_model("vit", image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="at least 2"):
        create_model("sl_vit", image_size=8, patch_size=1)
