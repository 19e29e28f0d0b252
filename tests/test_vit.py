"ViT and SL-ViT (chapter 5): variants, sizes against the paper, gradients, bad input."
import math

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


def _moments(t: torch.Tensor) -> tuple[float, float, float]:
    "Mean, standard deviation and kurtosis E[x⁴]/E[x²]² (3 for a normal, 1.8 for a uniform)."
    x = t.detach().double().flatten()
    x0 = x - x.mean()
    return x.mean().item(), x.std().item(), ((x0 ** 4).mean() / (x0 ** 2).mean() ** 2).item()


def test_initialisation_follows_the_official_code():
    "Xavier-normal Linear weights, zero biases, unit LayerNorms, N(0, 1) class token and positions."
    torch.manual_seed(0)
    m = create_model("sl_vit", image_size=32)                 # the paper's CIFAR SL-ViT
    linears = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) == 1 + 4 * m.config.depth + 1        # SPT's, four a block, the head's
    for name, lin in linears:
        fan_out, fan_in = lin.weight.shape
        mean, std, kurt = _moments(lin.weight)
        expected = math.sqrt(2 / (fan_in + fan_out))
        n = lin.weight.numel()
        assert abs(mean) < 5 * expected / math.sqrt(n), name
        assert abs(std / expected - 1) < 5 / math.sqrt(2 * n), (name, std, expected)
        assert abs(kurt - 3) < 5 * math.sqrt(24 / n), (name, kurt)   # normal, not uniform
        if lin.bias is not None: assert (lin.bias == 0).all(), name
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert len(norms) == 1 + 2 * m.config.depth + 1         # SPT's, two a block, the head's
    for ln in norms: assert (ln.weight == 1).all() and (ln.bias == 0).all()
    for p in (m.embed.pos_embed, m.embed.cls_token):
        mean, std, kurt = _moments(p)
        assert abs(mean) < 5 / math.sqrt(p.numel()) and abs(std - 1) < 5 / math.sqrt(2 * p.numel())
    assert abs(_moments(m.embed.pos_embed)[2] - 3) < 5 * math.sqrt(24 / m.embed.pos_embed.numel())
    for b in m.blocks: assert (b.attn.temperature() == 4.0).all()   # τ = √d_k = √16


def test_stochastic_depth_drops_whole_samples_in_training_only():
    "Training drops each sample's residual branch with probability p; evaluation keeps them all."
    p = 0.5
    torch.manual_seed(0)
    m = create_model("vit", image_size=16, preset="tiny", drop_path=p)
    plain = create_model("vit", image_size=16, preset="tiny", drop_path=0.0)
    plain.load_state_dict(m.state_dict())
    calls = []                                  # (branch, its output) at every residual branch
    for b in m.blocks: b.drop_path.register_forward_hook(lambda _, i, o: calls.append((i[0], o)))
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        m.eval()
        a, b = m(x), m(x)
        assert torch.equal(a, b) and torch.equal(a, plain.eval()(x))
        assert len(calls) == 2 * 2 * len(m.blocks) and all(torch.equal(i, o) for i, o in calls)
        calls.clear()
        m.train()
        torch.manual_seed(1)
        one = m(x)
        dropped = []
        for branch, out in calls:               # per sample: all zeros or branch / (1 - p)
            zero = (out == 0).flatten(1).all(1)
            torch.testing.assert_close(out[~zero], branch[~zero] / (1 - p))
            assert 0 < zero.sum() < len(x)      # some samples dropped, others kept, in one call
            dropped.append(zero.float().mean())
        assert abs(torch.stack(dropped).mean() - p) < 0.1   # 256 draws: 4 standard deviations
        torch.manual_seed(1)
        assert torch.equal(m(x), one)           # the seed decides which branches drop
        torch.manual_seed(2)
        assert not torch.equal(m(x), one)
        assert torch.equal(plain.train()(x), plain.eval()(x))   # p = 0: training changes nothing
