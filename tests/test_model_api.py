"ViT, PiT, Swin follow timm: forward_head, num_classes=0, reset_classifier, no_weight_decay, and timm's model API."
import copy

import pytest
import torch
from torch import nn

from vitsd_nbdev.training import param_groups
from vitsd_nbdev.vit import create_model

MODELS = [("vit", 32), ("sl_vit", 32), ("sl_pit", 32), ("pit", 32), ("swin", 16), ("sl_swin", 16)]


@pytest.mark.parametrize("name,size", MODELS)
def test_head_conventions(name, size):
    torch.manual_seed(0)
    m = create_model(name, image_size=size, preset="tiny").eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(m.forward_head(m.forward_features(x)), m(x))
        feats = m.forward_head(m.forward_features(x), pre_logits=True)
        headless = create_model(name, num_classes=0, image_size=size, preset="tiny").eval()
        missing = headless.load_state_dict(m.state_dict(), strict=False)
        assert missing.missing_keys == [] and all("head" in k for k in missing.unexpected_keys)
        # no classifier: pooled features
        assert torch.equal(headless(x), feats)
    m.reset_classifier(7)
    assert m(x).shape == (2, 7) and m.config.num_classes == 7
    m.reset_classifier(0)
    assert m(x).shape == feats.shape


@pytest.mark.parametrize("name,size", MODELS + [("vit_lsa", 32)])
@pytest.mark.parametrize("form", ["inverse", "direct"])
def test_no_weight_decay_gives_the_groups_of_the_name_rule(name, size, form):
    "no_weight_decay() chooses by what a parameter is; it agrees with the old shape-and-name rule."
    kw = {"temperature_form": form} if "vit" in name else {}
    if form == "direct" and not kw: pytest.skip("the temperature form is a ViT option")
    m = create_model(name, image_size=size, preset="tiny", **kw)
    nwd = m.no_weight_decay()
    old = {n for n, p in m.named_parameters()
           if (p.ndim < 2 or n.endswith(("pos_embed", "cls_token", "bias_table")))
           and not n.endswith("temperature.scale")}
    assert nwd == old
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in param_groups(m, 0.05)[1]["params"]} == nwd


def test_timm_create_model_builds_ours():
    timm = pytest.importorskip("timm")
    from vitsd_nbdev.timm_sl import register_timm_models
    names = register_timm_models()
    assert len(names) == len(set(names)) and set(names) <= set(timm.list_models("vitsd_*"))
    m = timm.create_model("vitsd_sl_vit", num_classes=4, img_size=16, in_chans=1, preset="tiny")
    assert type(m).__name__ == "ViT" and m.config.spt
    assert m(torch.zeros(2, 1, 16, 16)).shape == (2, 4)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("vitsd_vit", pretrained=True)


# ---- timm's model API (TimmModelAPI) on ViT, PiT and Swin: what each model promises, checked ----

API = [("vit", 32), ("sl_vit", 32), ("pit", 32), ("sl_pit", 32), ("swin", 32), ("sl_swin", 32)]


def tiny(name, size=32, **kw):
    "A small model of each family (PiT's and Swin's tiny presets have 3 and 2 stages)."
    if "swin" in name: kw = dict(dict(embed_dim=16, depths=(1, 1, 1), heads=(1, 2, 4)), **kw)
    return create_model(name, image_size=size, preset=None if "swin" in name else "tiny", **kw)


def stage_shapes(m, size):
    "Expected [d, h, w] after each block (ViT) or stage (PiT, Swin), from the model's config."
    c = m.config
    if hasattr(c, "depth"): return [(c.dim, size // c.patch_size, size // c.patch_size)] * c.depth
    if hasattr(c, "stages"): return [(s["dim"], s["grid"], s["grid"]) for s in c.stages]  # Swin
    return [(d, g, g) for d, g in zip(c.dims, c.grids)]


@pytest.mark.parametrize("name,size", API)
def test_feature_info_and_widths(name, size):
    m = tiny(name, size)
    shapes = stage_shapes(m, size)
    assert [f["num_chs"] for f in m.feature_info] == [d for d, _, _ in shapes]
    assert [f["reduction"] for f in m.feature_info] == [size // g for _, g, _ in shapes]
    assert all(isinstance(m.get_submodule(f["module"]), nn.Module) for f in m.feature_info)
    assert m.num_features == m.head_hidden_size == shapes[-1][0] and m.in_chans == 3
    assert m.get_classifier() is m.head and m.num_prefix_tokens == (0 if "swin" in name else 1)
    assert m.forward_features(torch.zeros(1, 3, size, size)).shape[-1] == m.num_features


@pytest.mark.parametrize("name,size", API)
def test_forward_intermediates(name, size):
    torch.manual_seed(0)
    m = tiny(name, size).eval()
    x = torch.randn(2, 3, size, size)
    shapes = stage_shapes(m, size)
    with torch.no_grad():
        final, maps = m.forward_intermediates(x)
        torch.testing.assert_close(final, m.forward_features(x))
        assert [tuple(f.shape) for f in maps] == [(2, *s) for s in shapes]
        tokens = m.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        assert [tuple(t.shape) for t in tokens] == [(2, h * w, d) for d, h, w in shapes]
        for f, t in zip(maps, tokens): assert torch.equal(f, t.transpose(1, 2).unflatten(2, f.shape[2:]))
        # indices: the last k, or a list (negative from the end); stop_early runs no more stage
        n = len(shapes)
        last_two = m.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last_two, maps[-2:]))
        first = m.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert len(first) == 1 and torch.equal(first[0], maps[0])
        normed = m.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NLC")[1][0]
        torch.testing.assert_close(normed, final[:, m.num_prefix_tokens:])
        if n > 1 and "vit" not in name:  # the final norm fits only the last stage
            early = m.forward_intermediates(x, indices=[0], norm=True, intermediates_only=True)
            assert torch.equal(early[0], maps[0])
    with pytest.raises(ValueError, match="output_fmt"): m.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="out of range"): m.forward_intermediates(x, indices=[n])


@pytest.mark.parametrize("name,size", API)
def test_prune_intermediate_layers(name, size):
    "After pruning to stage i: the same tap as unpruned, the right widths, every parameter used."
    torch.manual_seed(0)
    model = tiny(name, size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(): taps = model.forward_intermediates(x, intermediates_only=True)
    for i in range(len(taps)):
        m = copy.deepcopy(model)
        kept = m.prune_intermediate_layers([i])
        assert kept == [i] and len(m.feature_info) == i + 1
        with torch.no_grad():
            torch.testing.assert_close(m.forward_intermediates(x, indices=kept,
                                                               intermediates_only=True)[0], taps[i])
            assert m(x).shape[-1] == taps[i].shape[1] == m.num_features == m.head_hidden_size
        assert not any(mod.training for mod in m.modules())   # eval stays eval
        m.train()
        sum(f.sum() for f in m.forward_intermediates(x, indices=kept, intermediates_only=True)
            + [m.forward_features(x)]).backward()
        assert [n for n, p in m.named_parameters() if p.grad is None] == []
    # pruning nothing at the last stage, and keeping the head: the same model
    m = copy.deepcopy(model)
    m.prune_intermediate_layers([len(taps) - 1], prune_head=False)
    with torch.no_grad(): torch.testing.assert_close(m(x), model(x))


@pytest.mark.parametrize("name,size", API)
def test_group_matcher_gives_layer_decay_groups(name, size):
    timm = pytest.importorskip("timm")
    import timm.optim
    from timm.models._manipulate import group_parameters
    m = tiny(name, size)
    layer = group_parameters(m, m.group_matcher(coarse=False), reverse=True)
    names = [n for n, _ in m.named_parameters()]
    assert set(layer) == set(names)
    n_blocks = len(m.blocks) if hasattr(m, "blocks") else sum(len(s) for s in m.stages)
    n_between = len(getattr(m, "pools", getattr(m, "merges", [])))
    # embedding, each block, each pooling or merging layer, the head (the final norm joins the last block)
    assert len(set(layer.values())) == 1 + n_blocks + n_between + 1
    assert {layer[n] for n in names if n.startswith("embed.")} == {0}
    assert {layer[n] for n in names if n.startswith("head.")} == {max(layer.values())}
    assert {layer[n] for n in names if n.startswith("norm.")} == {max(layer.values()) - 1}
    coarse = group_parameters(m, m.group_matcher(coarse=True), reverse=True)
    assert 1 < len(set(coarse.values())) <= len(set(layer.values()))
    opt = timm.optim.create_optimizer_v2(m, "adamw", lr=1e-3, layer_decay=0.65)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == len(set(layer.values())) and scales[-1] == 1.0


@pytest.mark.parametrize("name,size", API)
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(name, size):
    x = torch.randn(2, 3, size, size)
    grads, outs = [], []
    for on in (False, True):
        torch.manual_seed(0)
        m = tiny(name, size, drop_path=0.1).train()
        m.set_grad_checkpointing(on)
        torch.manual_seed(1)
        y = m(x)
        y.square().mean().backward()
        outs.append(y.detach()); grads.append([p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(*grads): torch.testing.assert_close(b, a)


@pytest.mark.parametrize("name,size", API)
def test_grad_checkpointing_recomputes_every_block(name, size):
    "With checkpointing on, each block runs again in the backward pass (in forward_intermediates too)."
    m = tiny(name, size).train()
    blocks = list(m.blocks) if hasattr(m, "blocks") else [b for s in m.stages for b in s]
    calls = []
    for b in blocks: b.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    x = torch.randn(2, 3, size, size)
    for on, runs in ((False, 1), (True, 2)):
        m.set_grad_checkpointing(on)
        for f in (m, lambda x: m.forward_intermediates(x)[0]):
            calls.clear()
            f(x).sum().backward()
            assert [calls.count(b) for b in blocks] == [runs] * len(blocks)


@pytest.mark.parametrize("name,size", API)
def test_meta_device_bfloat16_and_reset_classifier_keep_device_and_dtype(name, size):
    with torch.device("meta"):
        m = tiny(name, size)
    assert {p.device.type for p in m.parameters()} | {b.device.type for b in m.buffers()} == {"meta"}
    assert m(torch.randn(2, 3, size, size, device="meta")).shape == (2, 10)
    m.to(torch.bfloat16)
    assert m(torch.randn(2, 3, size, size, device="meta", dtype=torch.bfloat16)).dtype == torch.bfloat16
    m.to("meta", torch.float64).eval()
    m.reset_classifier(0); m.reset_classifier(2)
    assert {(p.device.type, p.dtype) for p in m.get_classifier().parameters()} == {("meta", torch.float64)}
    assert not any(mod.training for mod in m.modules())


@pytest.mark.parametrize("name,size", API)
def test_global_pool(name, size):
    torch.manual_seed(0)
    m = tiny(name, size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        z = m.forward_features(x)
        m.reset_classifier(0, "avg")
        torch.testing.assert_close(m(x), z[:, m.num_prefix_tokens:].mean(1))
        m.reset_classifier(0, "")
        assert torch.equal(m(x), z)
    bad = "token" if "swin" in name else "max"
    with pytest.raises(ValueError, match="global_pool must be") as e: m.reset_classifier(3, bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="global_pool must be"): tiny(name, size, global_pool=bad)


@pytest.fixture(scope="module")
def timm_tracer_kwargs():
    "timm's tracer settings (its fx tests use them), after registering our models with timm."
    pytest.importorskip("timm")
    from timm.models import get_notrace_functions, get_notrace_modules
    from vitsd_nbdev.timm_sl import register_timm_models
    register_timm_models()   # also marks the shared shape-checking layers as leaves
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


@pytest.mark.parametrize("name,size", API)
def test_torch_fx_traces_with_timms_tracer(name, size, timm_tracer_kwargs):
    "torchvision's create_feature_extractor with timm's tracer settings, as timm's own fx tests."
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    kw = timm_tracer_kwargs
    torch.manual_seed(0)
    m = tiny(name, size).eval()
    x = torch.randn(2, 3, size, size)
    train_nodes, eval_nodes = get_graph_node_names(m, tracer_kwargs=kw)
    fx = create_feature_extractor(m, train_return_nodes=train_nodes[-1:],
                                  eval_return_nodes=eval_nodes[-1:], tracer_kwargs=kw)
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx(x).values())), m(x), rtol=1e-4, atol=1e-5)
