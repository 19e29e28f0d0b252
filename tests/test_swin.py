"Swin and SL-Swin (chapter 9): windows, shift mask, LSA, patch merging, model, FLOPs, trainer."
import math
import tempfile

import pytest
import torch
from einops import rearrange
from torch import nn

from vitsd_nbdev.lsa import attention_weights
from vitsd_nbdev.spt import ShiftedPatchTokenization, SPTPooling
from vitsd_nbdev.swin import (SWIN_VARIANTS, PatchMerging, Swin, SwinConfig, WindowAttention,
                              create_swin, relative_position_index, shifted_window_mask,
                              window_partition, window_reverse)
from vitsd_nbdev.training import TrainConfig, param_groups, train
from vitsd_nbdev.vit import count_flops, count_params, create_model

# three stages like the paper's, narrow
SMALL = dict(embed_dim=24, depths=(2, 2, 2), heads=(1, 2, 4))


def brute_force_window_mask(grid, M, s):
    "The shifted-window mask from image positions: a pair may attend iff in one shifted window."
    per_side = grid // M
    out = torch.zeros(per_side ** 2, M * M, M * M)
    for w in range(per_side ** 2):
        wr, wc = divmod(w, per_side)
        cells = [(wr * M + a, wc * M + b) for a in range(M) for b in range(M)]
        for i, (r1, c1) in enumerate(cells):
            for j, (r2, c2) in enumerate(cells):
                img1, img2 = ((r1 + s) % grid, (c1 + s) % grid), ((r2 + s) % grid, (c2 + s) % grid)
                if any((p + M - s) // M != (q + M - s) // M for p, q in zip(img1, img2)):
                    out[w, i, j] = float("-inf")
    return out


def dense_window_attention(x, a: WindowAttention):
    "Dense attention over the map, each query kept to its own (shifted) window, bias by offset."
    g, M, s, h = a.grid, a.window_size, a.shift, a.heads
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    pos = torch.stack([r.flatten(), c.flatten()], -1)
    win = (pos + (M - s) % M) // M
    same = (win[:, None] == win[None]).all(-1)
    off = pos[:, None] - pos[None] + M - 1
    idx = (off[..., 0] * (2 * M - 1) + off[..., 1]).clamp(0, (2 * M - 1) ** 2 - 1)
    bias = a.relative_position_bias_table[idx].permute(2, 0, 1).masked_fill(~same, float("-inf"))
    q, k, v = rearrange(a.qkv(x), "b n (three h d) -> three b h n d", three=3, h=h)
    w = attention_weights(q, k, a.temperature() if a.lsa else math.sqrt(a.head_dim), a.lsa, bias)
    return a.proj(rearrange(w @ v, "b h n d -> b n (h d)"))


def test_window_partition_round_trip_and_order():
    x = torch.randn(2, 8, 12, 5)
    assert torch.equal(window_reverse(window_partition(x, 4), 4, 8), x)
    ids = torch.arange(64).view(1, 8, 8, 1)
    assert window_partition(ids, 4)[0, 1, :4, 0].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="does not divide"): window_partition(x, 3)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"): window_partition(x[0], 4)


def test_relative_position_index():
    idx = relative_position_index(4)
    assert idx.shape == (16, 16) and torch.equal(idx.unique(), torch.arange(49))
    assert torch.equal(idx.diag(), torch.full((16,), 24)) and idx[0, 5] == idx[10, 15]


@pytest.mark.parametrize("grid,M,s", [(8, 4, 2), (16, 4, 2), (12, 6, 3), (12, 4, 1)])
def test_shifted_window_mask_matches_brute_force(grid, M, s):
    mask = shifted_window_mask(grid, M, s)
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    assert torch.equal(mask, brute_force_window_mask(grid, M, s))


@pytest.mark.parametrize("grid,M,s", [(16, 4, 0), (16, 4, 2), (4, 4, 0), (12, 6, 3)])
@pytest.mark.parametrize("lsa", [False, True])
def test_window_attention_equals_dense_definition(grid, M, s, lsa):
    torch.manual_seed(0)
    a = WindowAttention(32, 2, grid, M, s, lsa)
    with torch.no_grad():
        a.relative_position_bias_table.normal_()
        if lsa: a.temperature.set_(torch.empty(a.heads).uniform_(1, 6))
    x = torch.randn(2, grid * grid, 32)
    with torch.no_grad(): assert torch.allclose(a(x), dense_window_attention(x, a), atol=1e-5)


def test_lsa_window_weights_diagonal_zero_and_bias_enters():
    torch.manual_seed(1)
    a = WindowAttention(32, 2, grid=8, window_size=4, shift=2, lsa=True)
    with torch.no_grad():
        a.relative_position_bias_table.normal_()
        a.temperature.set_(torch.empty(a.heads).uniform_(1, 6))
        x = torch.randn(2, 64, 32)
        _, w = a(x, return_weights=True)                                   # [B, nW, heads, 16, 16]
        assert torch.equal(w.diagonal(dim1=-2, dim2=-1), torch.zeros(2, 4, 2, 16))
        assert w.masked_select(a.window_mask[None, :, None] == float("-inf")).abs().max() == 0
        win = window_partition(torch.roll(x.view(2, 8, 8, 32), (-2, -2), (1, 2)), 4)
        q, k, _ = rearrange(a.qkv(win), "b n t (three h d) -> three b n h t d", three=3, h=2)
        bias = a.relative_bias()[None] + a.window_mask[:, None]
        explicit = torch.stack([attention_weights(q[:, n], k[:, n], a.temperature(), True, bias[n])
                                for n in range(4)], 1)
        without_b = torch.stack([attention_weights(q[:, n], k[:, n], a.temperature(), True,
                                                   a.window_mask[n]) for n in range(4)], 1)
    assert torch.allclose(w, explicit, atol=1e-6)
    assert (w - without_b).abs().max() > 1e-2


def test_no_query_loses_every_key():
    for size in (32, 64):
        for st in SwinConfig(image_size=size).stages:
            for s in {0, st["shift"]}:
                # the constructor checks it
                WindowAttention(st["dim"], st["heads"], st["grid"], st["window"], s, lsa=True)
    with pytest.raises(ValueError, match="no key"):
        WindowAttention(32, 2, grid=8, window_size=2, shift=1, lsa=True)
    plain = WindowAttention(32, 2, grid=8, window_size=2, shift=1)
    assert not torch.isnan(plain(torch.randn(1, 64, 32))).any()


def test_patch_merging_counts_and_order():
    y = torch.randn(2, 256, 96)
    assert PatchMerging(96, 192)(y).shape == (2, 64, 192)
    assert SPTPooling(96, 192, merge_size=2, cls_token=False)(y).shape == (2, 64, 192)
    bare = PatchMerging(96, 192); bare.norm, bare.reduction = nn.Identity(), nn.Identity()
    assert torch.equal(bare(y)[:, 0], torch.cat([y[:, 0], y[:, 1], y[:, 16], y[:, 17]], -1))
    with pytest.raises(ValueError, match="square grid"): PatchMerging(96, 192)(y[:, :200])


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", list(SWIN_VARIANTS))
def test_paper_models_structure_and_shapes(name, size):
    m = create_model(name, num_classes=10, image_size=size).eval()
    assert isinstance(m, Swin) and m.config.patch_size == size // 16
    sl = name == "sl_swin"
    assert isinstance(m.embed.tokenizer, ShiftedPatchTokenization) == sl
    assert all(isinstance(mg, SPTPooling if sl else PatchMerging) for mg in m.merges)
    blocks = [b for st in m.stages for b in st]
    assert [b.attn.shift for b in blocks] == [0, 2] + [0, 2] * 3 + [0] * 4
    assert all((b.attn.temperature is not None) == sl for b in blocks)
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, size, size)).shape == (1, 16, 384)
        assert m(torch.randn(2, 3, size, size)).shape == (2, 10)


@pytest.mark.parametrize("name", list(SWIN_VARIANTS))
def test_every_parameter_gets_a_gradient_and_tables_skip_weight_decay(name):
    torch.manual_seed(0)
    m = create_model(name, image_size=32, **SMALL)
    nn.functional.cross_entropy(m(torch.randn(3, 3, 32, 32)), torch.arange(3)).backward()
    assert [n for n, p in m.named_parameters()
            if p.grad is None or not p.grad.abs().sum() > 0] == []
    no_decay = {id(p) for p in param_groups(m, 0.05)[1]["params"]}
    tables = [p for n, p in m.named_parameters() if n.endswith("bias_table")]
    assert len(tables) == 6 and all(id(p) in no_decay for p in tables)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown Swin model"): create_swin("swin_v2")
    with pytest.raises(ValueError, match="unknown Swin preset"):
        create_model("sl_swin", preset="huge")
    with pytest.raises(ValueError, match="unknown Swin option"): create_model("swin", dim=64)
    with pytest.raises(ValueError, match="not divisible by window size"):
        create_model("swin", image_size=40)
    with pytest.raises(ValueError, match="does not divide"): SwinConfig(image_size=32, patch_size=3)
    with pytest.raises(ValueError, match="at least 2"):
        create_model("sl_swin", image_size=16, preset="tiny", patch_size=1)
    with pytest.raises(ValueError, match="halved"):
        SwinConfig(image_size=24, patch_size=2, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8))
    with pytest.raises(ValueError, match="image size"):
        create_model("swin")(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\].*channel count"):
        create_model("swin")(torch.randn(1, 1, 32, 32))   # a grey image: a clear error, not a matmul's
    with pytest.raises(ValueError, match=r"\[B, 64, 32\]"):
        WindowAttention(32, 2, 8, 4)(torch.randn(1, 60, 32))


def test_flops_ratio_matches_the_paper():
    f = {n: count_flops(create_model(n, num_classes=200, image_size=64), 64) for n in SWIN_VARIANTS}
    assert abs(f["swin"] / 242.3e6 - 1) < 0.01 and abs(f["sl_swin"] / 284.9e6 - 1) < 0.01
    assert abs((f["sl_swin"] / f["swin"]) / (284.9 / 242.3) - 1) < 0.05


def test_one_epoch_of_training_on_digits():
    with tempfile.TemporaryDirectory() as d:
        s = train(TrainConfig(model="sl_swin", preset="tiny", dataset="digits", image_size=16,
                              epochs=1, warmup_epochs=0, batch_size=256, out_dir=d),
                  progress=False, log=False)
    assert s["epochs_done"] == 1
    assert s["final_acc"] > 0.15   # one epoch already learns: chance is 0.1 (measured: 0.24)
    assert s["params"] == count_params(create_model("sl_swin", image_size=16, preset="tiny",
                                                    in_chans=1))


def test_built_on_meta_then_materialised_gives_the_same_model():
    "Buffers are computed on the CPU; after to_empty(), timm's reinit_non_persistent_buffers restores them."
    timm = pytest.importorskip("timm")
    from timm.models._manipulate import reinit_non_persistent_buffers
    torch.manual_seed(0)
    ref = create_model("sl_swin", image_size=16, preset="tiny").eval()
    with torch.device("meta"):
        m = create_model("sl_swin", image_size=16, preset="tiny")
    assert all(b.device.type == "meta" for b in m.buffers())
    m = m.to_empty(device="cpu").eval()
    assert len(reinit_non_persistent_buffers(m)) == sum(len(st) for st in m.stages)
    m.load_state_dict(ref.state_dict())
    for (n, a), (_, b) in zip(ref.named_buffers(), m.named_buffers()): assert torch.equal(a, b), n
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(): assert torch.equal(m(x), ref(x))


def test_forward_features_ends_with_the_final_norm_and_global_pool():
    torch.manual_seed(0)
    m = create_model("swin", image_size=16, preset="tiny").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z = m.forward_features(x)
        raw = m.forward_intermediates(x, output_fmt="NLC")[1][-1]
        torch.testing.assert_close(z, m.norm(raw))
        torch.testing.assert_close(m(x), m.head(z.mean(1)))
        flat = create_model("swin", image_size=16, preset="tiny", num_classes=0, global_pool="")
        flat.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("head.")})
        assert torch.equal(flat.eval()(x), z)
    with pytest.raises(ValueError, match="no class token"):
        create_model("swin", image_size=16, preset="tiny", global_pool="token")
