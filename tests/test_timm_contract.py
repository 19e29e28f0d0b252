"Our registered models keep timm's model contract: pretrained configs, data config, model API."
import pytest
import torch

timm = pytest.importorskip("timm")
from timm.data import resolve_data_config  # noqa: E402
from timm.models import create_model, get_notrace_functions, get_notrace_modules  # noqa: E402
from timm.models._manipulate import group_parameters  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

from vitsd_nbdev.data import STATS  # noqa: E402
from vitsd_nbdev.timm_sl import TIMM_DATASETS, TIMM_MODELS, register_timm_models  # noqa: E402

NAMES = register_timm_models()
TAGS = [f"{n}.{t}" for n in NAMES for t in TIMM_DATASETS]
TINY = {"vitsd_pit": 32, "vitsd_sl_pit": 32, "vitsd_swin": 16, "vitsd_sl_swin": 16}


def tiny(name, **kw):
    "A small model of family `name` for the checks that run it (CPU seconds)."
    return create_model(name, preset="tiny", img_size=TINY.get(name, 32), **kw)


def test_every_model_is_registered_with_its_configs():
    assert NAMES == [f"vitsd_{n}" for n in TIMM_MODELS]
    assert set(NAMES) == set(timm.list_models("vitsd_*"))
    assert set(TAGS) == set(timm.list_models("vitsd_*", include_tags=True))
    assert not timm.list_models("vitsd_*", pretrained=True)  # no weights are published
    assert "vitsd_resnet20" not in timm.list_models("vitsd_*")


@pytest.mark.parametrize("name", TAGS)
def test_pretrained_cfg_says_what_the_model_is(name):
    model = create_model(name)
    cfg = model.pretrained_cfg
    dataset, classes, side = TIMM_DATASETS[name.split(".")[1]]
    mean, std = STATS[dataset]
    assert cfg["input_size"] == (model.in_chans, side, side) == (len(mean), side, side)
    assert model.config.image_size == side and model.num_classes == cfg["num_classes"] == classes
    assert (cfg["mean"], cfg["std"]) == (mean, std)
    assert cfg["fixed_input_size"] is True and not cfg.get("url") and not cfg.get("hf_hub_id")
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    first = model.get_submodule(cfg["first_conv"])
    assert first.weight.shape[1] % model.in_chans == 0   # it reads the image's channels
    # timm's data config is the dataset's: size, normalisation, no resizing
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (3, side, side) and (data["mean"], data["std"]) == (mean, std)
    assert data["crop_pct"] == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_sizes_heads_and_pooling(name):
    torch.manual_seed(0)
    m = tiny(name).eval()
    x = torch.randn(2, m.in_chans, m.config.image_size, m.config.image_size)
    with torch.no_grad():
        z = m.forward_features(x)
        feats = m.forward_head(z, pre_logits=True)
        assert z.ndim == 3 and z.shape[-1] == m.num_features
        assert feats.shape == (2, m.head_hidden_size)
        # timm's pooling: the class token, or the mean of the patch tokens (Swin: all tokens)
        pooled = z[:, 0] if m.config.global_pool == "token" else z[:, m.num_prefix_tokens:].mean(1)
        assert torch.equal(feats, pooled)
        assert torch.equal(m.forward_head(z), m(x)) and m(x).shape == (2, m.num_classes)
        m.reset_classifier(0)
        assert m.num_classes == 0 and torch.equal(m(x), feats)
        m.reset_classifier(3, "")   # no pooling: every token, classified
        assert m(x).shape == (2, z.shape[1], 3)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, "max")


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_keeps_device_dtype_and_mode(name):
    m = tiny(name).eval().to("meta", torch.float64)
    m.reset_classifier(5)
    head = m.get_classifier()
    assert head.weight.device.type == "meta" and head.weight.dtype == torch.float64
    assert not head.training


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_and_features_only(name):
    torch.manual_seed(0)
    m = tiny(name).eval()
    side = m.config.image_size
    x = torch.randn(2, m.in_chans, side, side)
    with torch.no_grad():
        final, maps = m.forward_intermediates(x)
        torch.testing.assert_close(final, m.forward_features(x))
        assert len(maps) == len(m.feature_info)
        for info, f in zip(m.feature_info, maps):
            assert f.shape == (2, info["num_chs"], side // info["reduction"], side // info["reduction"])
        tokens = m.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)
        assert torch.equal(tokens[0], maps[-1].flatten(2).transpose(1, 2))
        fm = tiny(name, features_only=True, out_indices=len(m.feature_info)).eval()
        out = fm(x)
        assert [o.shape[1] for o in out] == fm.feature_info.channels()
        assert [side // o.shape[-1] for o in out] == fm.feature_info.reduction()
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, indices=[len(m.feature_info)])


@pytest.mark.parametrize("name", NAMES)
def test_layer_decay_groups_the_layers(name):
    m = tiny(name)
    groups = group_parameters(m, m.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 2   # stem, blocks, final norm at least
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    scales = {g["lr_scale"] for g in opt.param_groups}
    assert max(scales) == 1.0 and min(scales) < 0.65 ** 2   # deeper layers learn faster
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_recomputes_and_changes_nothing_else(name):
    torch.manual_seed(0)
    m = tiny(name)
    m.eval()   # no stochastic depth: the two passes must agree
    x = torch.randn(2, m.in_chans, m.config.image_size, m.config.image_size)
    block = next(b for b in m.modules() if type(b).__name__.endswith("Block"))
    layer = block.mlp[0]   # the first layer of its MLP
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        "Gradients of a loss, and how often the first block's MLP ran for them."
        m.zero_grad()
        calls.clear()
        m(x).square().sum().backward()
        return [p.grad.clone() for p in m.parameters()], len(calls)

    plain, n_plain = grads()
    m.set_grad_checkpointing()
    ckpt, n_ckpt = grads()
    assert (n_plain, n_ckpt) == (1, 2)   # checkpointing runs the block again in the backward pass
    for g, h in zip(plain, ckpt):
        torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_fx_feature_extraction_and_export(name):
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    m = tiny(name).eval()
    x = torch.randn(1, m.in_chans, m.config.image_size, m.config.image_size)
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    last = f"{m.feature_info[-1]['module']}"
    fx = create_feature_extractor(m, return_nodes={last: "feat", "head": "logits"},
                                  tracer_kwargs=kw)
    exported = torch.export.export(m, (x,))   # what replaces TorchScript (chapter 12)
    with torch.no_grad():
        torch.testing.assert_close(fx(x)["logits"], m(x))
        torch.testing.assert_close(exported.module()(x), m(x))


def test_timm_keywords_and_errors():
    m = create_model("vitsd_sl_vit", num_classes=3, img_size=16, in_chans=1, preset="tiny",
                     drop_path_rate=0.05, global_pool="avg")
    assert (m.num_classes, m.in_chans, m.config.image_size) == (3, 1, 16)
    assert m.config.drop_path == 0.05 and m.config.global_pool == "avg"
    with pytest.raises(TypeError, match="unexpected keyword"):
        create_model("vitsd_vit", not_a_model_arg=1)
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("vitsd_vit", pretrained=True)
    with pytest.raises(ValueError, match="square"):
        create_model("vitsd_vit", img_size=(32, 16))
    with torch.device("meta"):
        assert next(create_model("vitsd_swin", device="meta").parameters()).device.type == "meta"
    assert next(create_model("vitsd_pit", dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
