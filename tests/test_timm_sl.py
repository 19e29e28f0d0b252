"""Converting a timm VisionTransformer to its SL form (chapter 9b): shapes, kept weights, the mask,
the temperatures, equivalence with the original without the mask, refusals, in-place conversion."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer  # noqa: E402

from vitsd_nbdev.timm_sl import LSAttention, SPTPatchEmbed, to_sl_vit  # noqa: E402
from vitsd_nbdev.vit import create_model  # noqa: E402


def small_vit(seed=0, **kw):
    "A small timm ViT: 16x16 images, 4x4 patches, width 48, 2 blocks of 4 heads (head_dim 12: odd)."
    torch.manual_seed(seed)
    args = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=48, depth=2, num_heads=4,
                mlp_ratio=2.0)
    return VisionTransformer(**{**args, **kw}).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny models: one thread is fastest, much faster than two when other processes share the cores."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(3, 3, 16, 16)


def test_in_place_and_shapes(x):
    m = small_vit()
    out_before = m(x).shape
    assert to_sl_vit(m) is m
    assert isinstance(m.patch_embed, SPTPatchEmbed)
    assert all(isinstance(b.attn, LSAttention) for b in m.blocks)
    assert m(x).shape == out_before == (3, 5)
    assert m.patch_embed(x).shape == (3, 16, 48)
    assert m.patch_embed.num_patches == 16 and m.patch_embed.grid_size == (4, 4)
    assert m.patch_embed.patch_size == (4, 4)
    assert m.forward_features(x).shape == (3, 17, 48)


def test_timm_sees_the_same_tokens_shape_from_forward_intermediates(x):
    m = to_sl_vit(small_vit())
    # reads patch_embed.dynamic_feat_size
    feats = m.forward_intermediates(x, intermediates_only=True)
    assert [f.shape for f in feats] == [(3, 48, 4, 4)] * 2


def test_weights_kept():
    m = small_vit(qkv_bias=True, qk_norm=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    after = to_sl_vit(m).state_dict()
    assert set(before) - set(after) == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert set(after) - set(before) == {"patch_embed.spt.norm.weight", "patch_embed.spt.norm.bias",
                                        "patch_embed.spt.proj.weight", "patch_embed.spt.proj.bias",
                                        "blocks.0.attn.temperature.scale",
                                        "blocks.1.attn.temperature.scale"}
    for k in set(before) & set(after):
        assert torch.equal(before[k], after[k]), k
    assert "blocks.0.attn.qkv.bias" in after and "blocks.0.attn.q_norm.weight" in after


def test_switches_separately():
    m = to_sl_vit(small_vit(), spt=False)
    assert not isinstance(m.patch_embed, SPTPatchEmbed)
    assert all(isinstance(b.attn, LSAttention) for b in m.blocks)
    m = to_sl_vit(small_vit(), lsa=False)
    assert isinstance(m.patch_embed, SPTPatchEmbed)
    assert not any(isinstance(b.attn, LSAttention) for b in m.blocks)
    ref = small_vit()
    m = to_sl_vit(small_vit(), spt=False, lsa=False)
    assert m.state_dict().keys() == ref.state_dict().keys()


def test_spt_options_reach_the_tokenizer():
    m = to_sl_vit(small_vit(), lsa=False, shift=1, directions="all")
    assert m.patch_embed.spt.shift == 1 and m.patch_embed.spt.directions == "all"
    assert m.patch_embed.spt.proj.in_features == 9 * 3 * 4 * 4


def test_parameter_delta():
    m = small_vit()
    n0 = sum(p.numel() for p in m.parameters())
    n1 = sum(p.numel() for p in to_sl_vit(m).parameters())
    C, P, D, depth, heads, V = 3, 4, 48, 2, 4, 5
    assert n1 - n0 == (2 * V * C * P * P + V * C * P * P * D + D - (C * P * P * D + D)
                       + depth * heads)


def test_temperature_learnable_and_initialised_to_sqrt_head_dim(x):
    m = to_sl_vit(small_vit())
    for b in m.blocks:
        assert b.attn.temperature.scale.requires_grad
        torch.testing.assert_close(b.attn.temperature().detach(), torch.full((4,), math.sqrt(12)))
    m.train()
    F.cross_entropy(m(x), torch.tensor([0, 1, 2])).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    t0 = m.blocks[0].attn.temperature().detach().clone()
    opt.step()
    assert not torch.equal(m.blocks[0].attn.temperature().detach(), t0)


def test_diagonal_masked(x):
    m = to_sl_vit(small_vit(), spt=False)
    z = m._pos_embed(m.patch_embed(x))
    for b in m.blocks:
        w = b.attn.attention_weights(b.norm1(z))
        assert w.shape == (3, 4, 17, 17)
        assert w.diagonal(dim1=-2, dim2=-1).abs().max().item() == 0.0
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 4, 17))
        z = b(z)


def test_equivalent_to_original_without_mask(x):
    for kw in (dict(), dict(qkv_bias=False), dict(qk_norm=True), dict(init_values=0.1)):
        ref = small_vit(**kw)
        m = to_sl_vit(copy.deepcopy(ref), spt=False)
        for b in m.blocks: b.attn.diag_mask = False
        torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
        for b in m.blocks: b.attn.diag_mask = True
        assert (m(x) - ref(x)).abs().max() > 1e-4                  # the mask changes the output


def test_attention_layer_matches_explicit_lsa():
    ref = small_vit(qk_norm=True)
    attn = ref.blocks[0].attn
    torch.manual_seed(2)
    z = torch.randn(2, 17, 48)
    lsa = LSAttention(copy.deepcopy(attn))
    lsa.temperature.set_(torch.tensor([1.0, 2.0, 3.0, 5.0]))
    B, N, _ = z.shape
    q, k, v = (z @ attn.qkv.weight.T + attn.qkv.bias).reshape(B, N, 3, 4, 12).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) / lsa.temperature().detach().reshape(-1, 1, 1)
    logits = logits.masked_fill(torch.eye(N, dtype=torch.bool), float("-inf"))
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, 48))
    torch.testing.assert_close(lsa(z), expected, atol=1e-5, rtol=1e-5)


def test_attn_mask_passed_through(x):
    ref = small_vit()
    m = to_sl_vit(copy.deepcopy(ref), spt=False)
    for b in m.blocks: b.attn.diag_mask = False
    keep = torch.ones(17, 17, dtype=torch.bool); keep[:, -5:] = False
    torch.testing.assert_close(m.forward_features(x, attn_mask=keep),
                               ref.forward_features(x, attn_mask=keep), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="is_causal"):
        m.forward_features(x, is_causal=True)


def test_refusals_leave_the_model_unchanged():
    cases = {
        "timm VisionTransformer": lambda: create_model("vit", preset="tiny", image_size=16),
        "square patches": lambda: small_vit(patch_size=(4, 2)),
        "dynamic_img_size": lambda: small_vit(dynamic_img_size=True),
        "DiffAttention": lambda: small_vit(attn_layer="diff"),
        "no `attn` layer": lambda: small_vit(block_fn=ParallelScalingBlock),
        "attn_drop_rate=0": lambda: small_vit(attn_drop_rate=0.1),
        "does not divide img_size": lambda: small_vit(img_size=18),
    }
    for match, make in cases.items():
        m = make()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            to_sl_vit(m)
        after = m.state_dict()
        assert after.keys() == before.keys(), match
        assert all(torch.equal(after[k], before[k]) for k in before), match
    with pytest.raises(ValueError, match="ResNet"):
        to_sl_vit(timm.create_model("resnet18", pretrained=False))


def test_lsa_alone_works_with_dynamic_img_size():
    m = to_sl_vit(small_vit(dynamic_img_size=True), spt=False)
    assert m(torch.randn(1, 3, 24, 24)).shape == (1, 5)


def test_converting_twice_is_refused():
    m = to_sl_vit(small_vit())
    with pytest.raises(ValueError, match="already SPT"):
        to_sl_vit(m)
    with pytest.raises(ValueError, match="already has LSA"):
        to_sl_vit(m, spt=False)


def test_wrong_image_size_fails_in_one_line():
    m = to_sl_vit(small_vit())
    with pytest.raises(ValueError, match="img_size"):
        m(torch.randn(1, 3, 32, 32))


def test_module_does_not_import_timm():
    "Importing the module leaves timm alone (only `register_timm_models`, when called, imports it)."
    import subprocess, sys
    code = "import sys, vitsd_nbdev.timm_sl; assert 'timm' not in sys.modules, 'timm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
