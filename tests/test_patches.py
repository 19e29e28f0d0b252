"Patch tokenization (chapter 1): round trip, the Conv2d equivalence, token order, bad input."
import pytest
import torch
from einops import rearrange
from torch import nn

from vitsd_nbdev.patches import PatchEmbedding, PatchTokenization, patchify, unpatchify


@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 4), ((1, 1, 8, 12), 2), ((3, 5, 64, 64), 8),
                                     ((1, 3, 6, 6), 6)])
def test_round_trip(shape, p):
    x = torch.randn(shape)
    patches = patchify(x, p)
    B, C, H, W = shape
    assert patches.shape == (B, H * W // p**2, p * p * C)
    assert torch.equal(unpatchify(patches, p, height=H), x)


def test_patch_layout_row_major_row_col_channel():
    # pixel (c, y, x) of a 4x4 two-channel image, patch size 2: encode position in the value
    C, H, W, p = 2, 4, 4, 2
    x = torch.tensor([[[100 * c + 10 * y + xx for xx in range(W)] for y in range(H)]
                      for c in range(C)], dtype=torch.float)[None]
    patches = patchify(x, p)[0]
    # patch 1 is grid row 0, column 1 -> pixels x in {2, 3}, y in {0, 1};
    # vector order (row, col, channel)
    expected = [100 * c + 10 * y + xx for y in (0, 1) for xx in (2, 3) for c in (0, 1)]
    assert patches[1].tolist() == expected
    # patch 2 starts grid row 1
    assert patches[2][0].item() == 20


def test_linear_equals_strided_conv():
    torch.manual_seed(0)
    C, d, p = 3, 16, 4
    tok = PatchTokenization(C, d, p)
    conv = nn.Conv2d(C, d, kernel_size=p, stride=p)
    with torch.no_grad():
        conv.weight.copy_(rearrange(tok.proj.weight, "d (p1 p2 c) -> d c p1 p2", p1=p, p2=p))
        conv.bias.copy_(tok.proj.bias)
    x = torch.randn(2, C, 16, 24)
    expected = rearrange(conv(x), "b d h w -> b (h w) d")
    torch.testing.assert_close(tok(x), expected, rtol=1e-5, atol=1e-5)


def test_embedding_shapes_and_class_token():
    emb = PatchEmbedding(PatchTokenization(3, 8, 4), num_patches=16, dim=8)
    z = emb(torch.randn(5, 3, 16, 16))
    assert z.shape == (5, 17, 8)
    no_cls = PatchEmbedding(PatchTokenization(3, 8, 4), num_patches=16, dim=8, cls_token=False)
    assert no_cls(torch.randn(5, 3, 16, 16)).shape == (5, 16, 8)
    z.sum().backward()
    assert emb.cls_token.grad is not None and emb.pos_embed.grad is not None


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(1, 3, 32, 30), "does not divide"),
    (torch.zeros(1, 3, 30, 32), "does not divide"),
    (torch.zeros(3, 32, 32), r"\[B, C, H, W\]"),
    (torch.zeros(1, 1, 3, 32, 32), r"\[B, C, H, W\]"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        patchify(bad, 4)


def test_bad_unpatchify_and_wrong_image_size():
    with pytest.raises(ValueError, match="do not tile"):
        unpatchify(torch.zeros(1, 10, 48), 4, height=32)
    emb = PatchEmbedding(PatchTokenization(3, 8, 4), num_patches=64, dim=8)
    with pytest.raises(ValueError, match="image size"):
        emb(torch.zeros(1, 3, 16, 16))
