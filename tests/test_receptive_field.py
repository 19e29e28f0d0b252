"Receptive field (chapter 2): the formula, the gradient measurement, standard and SPT tokens."
import pytest
import torch
from einops.layers.torch import Rearrange
from torch import nn

from vitsd_nbdev.patches import PatchTokenization
from vitsd_nbdev.receptive_field import (receptive_field_formula, receptive_field_size,
                                         token_gradient_map)
from vitsd_nbdev.spt import SHIFT_DIRECTIONS, ShiftedPatchTokenization


def block_mask(i, P, H, W):
    r, c = divmod(i, W // P)
    m = torch.zeros(H, W, dtype=torch.bool)
    m[r * P:(r + 1) * P, c * P:(c + 1) * P] = True
    return m


def test_formula():
    assert [receptive_field_formula(P, P) for P in (1, 4, 16)] == [1, 4, 16]
    assert receptive_field_formula(3, 1, r_trans=3) == 5
    assert receptive_field_formula(3, 2, r_trans=3) == 7
    # SPT, P = 4, s = 2: kernel P + 2s, stride P
    assert receptive_field_formula(8, 4) == 8


@pytest.mark.parametrize("P", [2, 4, 8])
def test_standard_token_sees_exactly_its_patch(P):
    torch.manual_seed(0)
    img = torch.rand(3, 16, 16)
    tok = PatchTokenization(3, 12, P)
    for i in range((16 // P) ** 2):
        g = token_gradient_map(tok, img, i)
        assert torch.equal(g != 0, block_mask(i, P, 16, 16))
        assert receptive_field_size(g) == receptive_field_formula(P, P) == P


@pytest.mark.parametrize("directions", list(SHIFT_DIRECTIONS))
@pytest.mark.parametrize("P,s", [(4, 1), (4, 2), (4, 3), (4, 5), (8, 4), (2, 1)])
def test_spt_interior_token_sees_P_plus_2s(directions, P, s):
    torch.manual_seed(0)
    H = 6 * P
    img = torch.rand(3, H, H)
    spt = ShiftedPatchTokenization(3, 12, P, shift=s, directions=directions)
    # grid (3, 3): at least 3P from every border
    centre = (H // P) * (H // P // 2) + H // P // 2
    g = token_gradient_map(spt, img, centre)
    assert receptive_field_size(g) == receptive_field_formula(P + 2 * s, P) == P + 2 * s


def test_spt_default_doubles_the_receptive_field_and_fills_it():
    torch.manual_seed(0)
    img = torch.rand(3, 32, 32)
    # grid (3, 3), pixels 12..15
    g = token_gradient_map(ShiftedPatchTokenization(3, 16, 4), img, 27)
    assert receptive_field_size(g) == 8
    expected = torch.zeros(32, 32, dtype=torch.bool)
    # 2P window centred on the patch, fully seen
    expected[10:18, 10:18] = True
    assert torch.equal(g != 0, expected)


def test_spt_cardinal_misses_the_corners():
    torch.manual_seed(0)
    g = token_gradient_map(ShiftedPatchTokenization(3, 16, 4, directions="cardinal"),
                           torch.rand(3, 32, 32), 27)
    seen = g != 0
    assert receptive_field_size(g) == 8 and int(seen.sum()) == 16 + 4 * 2 * 4
    assert not seen[10:12, 10:12].any() and seen[12:16, 10:18].all() and seen[10:18, 12:16].all()


def test_spt_border_token_is_cut_by_the_image_edge():
    torch.manual_seed(0)
    g = token_gradient_map(ShiftedPatchTokenization(3, 16, 4), torch.rand(3, 32, 32), 0)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    # P + s: the zero fill outside carries nothing
    expected[:6, :6] = True
    assert torch.equal(g != 0, expected)


def test_measurement_on_a_cnn_matches_the_formula():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3),
                        Rearrange("b d h w -> b (h w) d"))
    g = token_gradient_map(cnn, torch.rand(3, 32, 32), 5 * 13 + 6)
    assert receptive_field_size(g) == receptive_field_formula(3, 2, r_trans=3) == 7


def test_gradient_map_leaves_the_tokenizer_unchanged():
    tok = PatchTokenization(3, 8, 4)
    before = tok.proj.weight.clone()
    token_gradient_map(tok, torch.rand(3, 8, 8), 1)
    assert tok.proj.weight.dtype == torch.float32 and torch.equal(tok.proj.weight, before)
    assert tok.proj.weight.grad is None


def test_receptive_field_size_of_shapes():
    m = torch.zeros(10, 10)
    assert receptive_field_size(m) == 0
    m[2, 3] = 1.0
    assert receptive_field_size(m) == 1
    m[4, 8] = 0.5
    # 3 rows by 6 columns: the longer side
    assert receptive_field_size(m) == 6


def test_bad_input_raises_one_line_value_errors():
    tok = PatchTokenization(3, 8, 4)
    cases = [
        (lambda: receptive_field_formula(0, 4), "kernel must be a positive integer"),
        (lambda: token_gradient_map(tok, torch.rand(1, 3, 8, 8), 0), "[C, H, W]"),
        (lambda: token_gradient_map(tok, torch.rand(3, 8, 8), 4), "out of range"),
        (lambda: token_gradient_map(nn.Identity(), torch.rand(3, 8, 8), 0), "[B, N, d]"),
        (lambda: receptive_field_size(torch.zeros(3, 8, 8)), "[H, W]"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError) as e:
            fn()
        assert msg in str(e.value) and "\n" not in str(e.value)
