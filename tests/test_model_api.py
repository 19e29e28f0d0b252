"ViT, PiT, Swin follow timm: forward_head, num_classes=0, reset_classifier, no_weight_decay."
import pytest
import torch

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
