"PiT and SL-PiT (chapter 9): shapes, pooling layers, where SPT and LSA go, gradients, bad input, FLOPs against the paper, training."
import json
import math

import pytest
import torch
import torch.nn.functional as F

from vitsd_nbdev.cli import train_main
from vitsd_nbdev.pit import PIT_MODELS, PIT_PRESETS, ConvPooling, PiT, PiTConfig, create_pit
from vitsd_nbdev.spt import ShiftedPatchTokenization, SPTPooling
from vitsd_nbdev.training import TrainConfig, param_groups, train
from vitsd_nbdev.vit import count_flops, count_params, create_model

PAPER_MFLOPS = {"pit": 279.2, "sl_pit": 322.9}  # official README, Tiny-ImageNet 64x64


@pytest.mark.parametrize("name", list(PIT_MODELS))
@pytest.mark.parametrize("size", [32, 64])
def test_stage_shapes_and_logits(name, size):
    m = create_pit(name, num_classes=10, image_size=size).eval()
    assert m.config.patch_size == size // 16 and m.config.dims == [96, 192, 384] and m.config.head_dim == 48
    x = torch.randn(2, 3, size, size)
    z = m.embed(x)
    for s, stage in enumerate(m.stages):
        if s: z = m.pools[s - 1](z)
        z = stage(z)
        g = 16 // 2 ** s
        assert z.shape == (2, 1 + g * g, 96 * 2 ** s)
    assert m(x).shape == (2, 10)


def test_conv_pooling_equals_a_hand_written_depthwise_conv():
    torch.manual_seed(0)
    pool = ConvPooling(4, 8)
    y = torch.randn(1, 1 + 16, 4)
    out = pool(y).detach()
    grid = F.pad(y[0, 1:].reshape(4, 4, 4), (0, 0, 1, 1, 1, 1))       # [h+2, w+2, d]
    w, b = pool.conv.weight.detach(), pool.conv.bias.detach()
    ref = torch.zeros(2, 2, 8)
    for i in range(2):
        for j in range(2):
            for o in range(8):
                ref[i, j, o] = (grid[2 * i:2 * i + 3, 2 * j:2 * j + 3, o // 2] * w[o, 0]).sum() + b[o]
    ref = ref.reshape(4, 8) @ pool.pointwise.weight.detach()[:, :, 0, 0].T + pool.pointwise.bias.detach()
    torch.testing.assert_close(out[0, 1:], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 0], pool.cls_proj(y[0, 0]).detach())


@pytest.mark.parametrize("pool", [ConvPooling(16, 32), SPTPooling(16, 32, merge_size=2)], ids=["conv", "spt"])
def test_pooling_token_count_and_class_token_path(pool):
    torch.manual_seed(0)
    y = torch.randn(2, 1 + 8 * 8, 16)
    out = pool(y).detach()
    assert out.shape == (2, 1 + 4 * 4, 32)
    y_cls = y.clone(); y_cls[:, 0] += 1.0
    out_cls = pool(y_cls).detach()
    assert torch.equal(out_cls[:, 1:], out[:, 1:]) and not torch.allclose(out_cls[:, 0], out[:, 0])
    y_vis = y.clone(); y_vis[:, 1:] = torch.randn(2, 64, 16)
    out_vis = pool(y_vis).detach()
    assert torch.equal(out_vis[:, 0], out[:, 0]) and not torch.allclose(out_vis[:, 1:], out[:, 1:])


@pytest.mark.parametrize("name", list(PIT_MODELS))
def test_spt_and_lsa_only_in_sl_pit(name):
    m = create_pit(name, image_size=16, preset="tiny")
    sl = PIT_MODELS[name]
    attn = [b.attn for stage in m.stages for b in stage]
    assert len(attn) == sum(m.config.depths) and m.config.sl == sl
    for a in attn:
        assert a.diag_mask == sl and (a.temperature is not None) == sl
        if sl: assert a.temperature.scale.requires_grad and torch.allclose(a.temperature(), torch.full_like(a.temperature(), math.sqrt(a.head_dim)))
    assert isinstance(m.embed.tokenizer, ShiftedPatchTokenization) == sl
    assert all(isinstance(p, SPTPooling if sl else ConvPooling) for p in m.pools) and len(m.pools) == 2


@pytest.mark.parametrize("name", list(PIT_MODELS))
def test_every_parameter_gets_a_gradient_and_embeddings_skip_decay(name):
    m = create_pit(name, num_classes=5, image_size=16, preset="tiny", in_chans=1)
    F.cross_entropy(m(torch.randn(4, 1, 16, 16)), torch.arange(4)).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    no_decay = {id(p) for p in param_groups(m, 0.05)[1]["params"]}
    assert id(m.embed.cls_token) in no_decay and id(m.embed.pos_embed) in no_decay


@pytest.mark.parametrize("make, message", [
    (lambda: create_pit("pyt"), "unknown PiT model"),
    (lambda: create_pit("pit", preset="huge"), "unknown PiT preset"),
    (lambda: create_pit("pit", width=64), "unknown PiT option"),
    (lambda: create_pit("pit", image_size=32, patch_size=3), "does not divide"),
    (lambda: create_pit("pit", image_size=30), "cannot be halved 2 times"),
    (lambda: create_pit("sl_pit", image_size=16), "at least 2"),
    (lambda: PiTConfig(image_size=32, patch_size=4, depths=(1,) * 5, heads=(1,) * 5), "cannot be halved"),
    (lambda: PiTConfig(depths=(1, 1), heads=(1, 1, 1)), "same number of stages"),
    (lambda: create_pit("pit", image_size=32)(torch.randn(2, 3, 64, 64)), "build the model for this image size"),
    (lambda: create_pit("pit", image_size=32)(torch.randn(3, 32, 32)), "expected images"),
    (lambda: ConvPooling(8, 16)(torch.randn(2, 64, 8)), "square grid"),
    (lambda: ConvPooling(8, 12), "multiple of in_dim"),
    (lambda: create_pit("pit", global_pool="mean"), "global_pool must be"),
    (lambda: create_pit("pit", image_size=16, preset="tiny").forward_intermediates(torch.randn(1, 3, 16, 16), indices=4), "asks for the last 4 of 3"),
])
def test_bad_input_gets_a_one_line_value_error(make, message):
    with pytest.raises(ValueError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


def test_create_model_dispatches_to_create_pit():
    for name in PIT_MODELS:
        m = create_model(name, num_classes=7, image_size=16, preset="tiny", in_chans=1, patch_size=2, drop_path=0.1)
        assert isinstance(m, PiT) and m.config.sl == PIT_MODELS[name]
        assert (m.config.in_chans, m.config.patch_size, m.config.drop_path, m.config.num_classes) == (1, 2, 0.1, 7)
        assert m(torch.randn(2, 1, 16, 16)).shape == (2, 7)


def test_flop_ratio_matches_the_paper():
    f = {n: count_flops(create_pit(n, num_classes=200, image_size=64), 64) for n in PIT_MODELS}
    ratio, paper = f["sl_pit"] / f["pit"], PAPER_MFLOPS["sl_pit"] / PAPER_MFLOPS["pit"]
    assert abs(ratio / paper - 1) < 0.05
    for n in PIT_MODELS: assert abs(f[n] / 1e6 / PAPER_MFLOPS[n] - 1) < 0.03   # our counter leaves out LayerNorms


def test_tiny_preset_is_small():
    assert set(PIT_PRESETS) == {"tiny"}
    for n in PIT_MODELS: assert count_params(create_pit(n, image_size=16, preset="tiny", in_chans=1)) < 500_000


def test_one_epoch_of_training_on_digits(tmp_path):
    s = train(TrainConfig(model="sl_pit", preset="tiny", dataset="digits", image_size=16, epochs=1, warmup_epochs=0,
                          batch_size=64, out_dir=str(tmp_path)), progress=False, log=False)
    assert s["model"] == "sl_pit" and s["epochs_done"] == 1
    assert s["final_acc"] > 0.2   # one epoch already learns: chance is 0.1 (measured: 0.42)


def test_cli_trains_a_pit(tmp_path, run_folder_check):
    "The run folder rebuilds the PiT that the CLI trained; its weights give the reported accuracy."
    train_main(["--model", "pit", "--preset", "tiny", "--dataset", "digits", "--image-size", "16",
                "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "32", "--no-progress",
                "--out-dir", str(tmp_path)])
    metrics = run_folder_check(tmp_path)
    spec = dict(name="pit", num_classes=10, image_size=16, preset="tiny", in_chans=1)
    assert json.loads((tmp_path / "config.json").read_text())["model"] == spec
    assert metrics["summary"]["final_acc"] > 0.3       # chance is 0.1 (measured: 0.56)


def test_checkpoints_with_the_old_head_still_load():
    "Before version 0.0.2 the final norm was head.0 and the classifier head.1; such files still load."
    torch.manual_seed(0)
    m = create_pit("sl_pit", image_size=16, preset="tiny").eval()
    old = {k.replace("norm.", "head.0.", 1) if k.startswith("norm.") else
           k.replace("head.", "head.1.", 1) if k.startswith("head.") else k: v
           for k, v in m.state_dict().items()}
    assert {"head.0.weight", "head.1.weight"} <= set(old) and "norm.weight" not in old
    fresh = create_pit("sl_pit", image_size=16, preset="tiny").eval()
    fresh.load_state_dict(old)   # strict
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(): assert torch.equal(fresh(x), m(x))


def test_forward_features_ends_with_the_final_norm():
    "timm's meaning: forward_features includes the final norm; forward_head only pools and classifies."
    torch.manual_seed(0)
    m = create_pit("pit", image_size=16, preset="tiny").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z = m.forward_features(x)
        raw = m.forward_intermediates(x, output_fmt="NLC")[1][-1]   # last stage, before the norm
        torch.testing.assert_close(z[:, 1:], m.norm(raw))
        torch.testing.assert_close(m(x), m.head(z[:, 0]))


@pytest.mark.parametrize("pool", ["avg", ""])
def test_global_pool_other_than_the_class_token(pool):
    m = create_pit("pit", image_size=16, preset="tiny", num_classes=0, global_pool=pool).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z = m.forward_features(x)
        assert torch.equal(m(x), z[:, 1:].mean(1) if pool else z)
