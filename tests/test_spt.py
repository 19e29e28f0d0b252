"Shifted Patch Tokenization (chapter 3): shifted copies, S(x) by its definition, S_pool, bad input."
import pytest
import torch
from einops import rearrange

from vitsd_nbdev.patches import PatchEmbedding, patchify
from vitsd_nbdev.spt import SHIFT_DIRECTIONS, ShiftedPatchTokenization, SPTPooling, shifted_views


def shift_naive(x, dy, dx, s):
    "Pixel-loop reference: copy x[..., i - dy*s, j - dx*s] where it exists, else 0."
    H, W = x.shape[-2:]
    out = torch.zeros_like(x)
    for i in range(H):
        for j in range(W):
            si, sj = i - dy * s, j - dx * s
            if 0 <= si < H and 0 <= sj < W:
                out[..., i, j] = x[..., si, sj]
    return out


@pytest.mark.parametrize("directions,n", [("diagonal", 4), ("cardinal", 4), ("all", 8)])
@pytest.mark.parametrize("shift", [1, 2, 5])
def test_shifted_views_match_pixel_loop(directions, n, shift):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 10)
    out = shifted_views(x, shift, directions)
    assert out.shape == (2, 3 * (1 + n), 6, 10)
    assert torch.equal(out[:, :3], x)
    for k, (dy, dx) in enumerate(SHIFT_DIRECTIONS[directions].values(), start=1):
        assert torch.equal(out[:, 3 * k:3 * k + 3], shift_naive(x, dy, dx, shift))


def test_direction_names_mean_where_the_content_goes():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0                                          # one bright pixel in the centre
    out = shifted_views(x, 1, "all")[0]
    names = list(SHIFT_DIRECTIONS["all"])
    expected = {"left-up": (1, 1), "right-up": (1, 3), "left-down": (3, 1), "right-down": (3, 3),
                "left": (2, 1), "right": (2, 3), "up": (1, 2), "down": (3, 2)}
    for k, name in enumerate(names, start=1):
        assert out[k].nonzero().tolist() == [list(expected[name])], name
    assert names[:4] == ["left-up", "right-up", "left-down", "right-down"]


def test_spt_equals_layernorm_and_linear_on_patchified_views():
    torch.manual_seed(0)
    spt = ShiftedPatchTokenization(3, 16, 4, directions="cardinal", shift=1)
    with torch.no_grad():
        spt.norm.weight.normal_(); spt.norm.bias.normal_()
    x = torch.randn(2, 3, 8, 12)
    z = patchify(shifted_views(x, 1, "cardinal"), 4)
    z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = (z * spt.norm.weight + spt.norm.bias) @ spt.proj.weight.T + spt.proj.bias
    out = spt(x)
    assert out.shape == (2, 6, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_spt_defaults_follow_the_paper():
    spt = ShiftedPatchTokenization(3, 192, 4)
    assert (spt.patch_size, spt.dim, spt.shift, spt.directions) == (4, 192, 2, "diagonal")
    assert spt.norm.normalized_shape == (240,) and spt.proj.in_features == 240
    assert ShiftedPatchTokenization(3, 192, 8, directions="all").proj.in_features == 8 * 8 * 3 * 9
    # parameters in the CIFAR setting: 46,752 against 9,408 for the standard tokenizer
    assert sum(p.numel() for p in spt.parameters()) == 240 * 192 + 192 + 2 * 240


def test_spt_as_patch_embedding():
    embed = PatchEmbedding(ShiftedPatchTokenization(3, 32, 4), num_patches=64, dim=32)
    assert embed(torch.randn(2, 3, 32, 32)).shape == (2, 65, 32)


def test_spt_pooling_counts_and_class_token_path():
    torch.manual_seed(0)
    pool = SPTPooling(16, 32)
    y = torch.randn(2, 65, 16)
    with torch.no_grad():
        out = pool(y)
        assert out.shape == (2, 17, 32)
        torch.testing.assert_close(out[:, 0], pool.cls_proj(y[:, 0]))
        y2 = y.clone(); y2[:, 7] += 1.0
        out2 = pool(y2)
        # class token unaffected by an image token
        assert torch.equal(out2[:, 0], out[:, 0])
        assert not torch.allclose(out2[:, 1:], out[:, 1:])
        y3 = y.clone(); y3[:, 0] += 1.0
        # image tokens unaffected by the class token
        assert torch.equal(pool(y3)[:, 1:], out[:, 1:])


def test_spt_pooling_reshape_matches_patchify_order():
    torch.manual_seed(0)
    pool = SPTPooling(8, 12, cls_token=False)
    fmap = torch.randn(2, 8, 6, 6)
    tokens = rearrange(fmap, "b d h w -> b (h w) d")
    with torch.no_grad():
        torch.testing.assert_close(pool(tokens), pool.spt(fmap))
    assert pool(tokens).shape == (2, 9, 12) and pool.cls_proj is None


def test_bad_input_raises_one_line_value_errors():
    x = torch.randn(1, 3, 8, 8)
    cases = [
        (lambda: shifted_views(x[0], 2), "[B, C, H, W]"),
        (lambda: shifted_views(x, 2, "eight"), "'diagonal', 'cardinal', 'all'"),
        (lambda: shifted_views(x, 0), "1 <= shift < 8"),
        (lambda: shifted_views(x, 8), "1 <= shift < 8"),
        (lambda: ShiftedPatchTokenization(3, 8, 1), "shift must be an integer >= 1"),
        (lambda: ShiftedPatchTokenization(3, 8, 4, directions="diag"), "unknown shift directions"),
        (lambda: ShiftedPatchTokenization(3, 8, 4)(torch.randn(1, 3, 8, 6)), "does not divide"),
        (lambda: SPTPooling(8, 8)(torch.randn(1, 64, 8)), "cls_token=False"),
        (lambda: SPTPooling(8, 8)(torch.randn(1, 10, 8)), "not divisible by merge_size 2"),
        (lambda: SPTPooling(8, 8)(torch.randn(10, 8)), "[B, N, d]"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError) as e:
            fn()
        assert msg in str(e.value) and "\n" not in str(e.value)
