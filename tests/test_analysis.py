"Locality diagnostics and results tables (chapter 8): defining cases, loop agreement, bad input."
import json
import math

import pytest
import torch
from torch import nn

from vitsd_nbdev.analysis import (ablation_markdown, attention_distance, paired_difference,
                                  attention_rollout, attention_stats, cls_attention,
                                  effective_receptive_field, load_results, locality_shares,
                                  mean_std, patch_share, rollout_cls_map, summarise_runs,
                                  temperatures, to_pixels, token_positions)
from vitsd_nbdev.lsa import attention_entropy
from vitsd_nbdev.vit import create_model


def naive_distance(w, patch_size):
    "Mean attention distance of one [N+1, N+1] map with the class token first, by loops."
    n = w.shape[-1] - 1; side = math.isqrt(n); total = 0.0
    for i in range(n):
        row = w[1 + i, 1:] / w[1 + i, 1:].sum()
        for j in range(n):
            dy, dx = (i // side - j // side) * patch_size, (i % side - j % side) * patch_size
            total += row[j].item() * math.hypot(dy, dx)
    return total / n


def test_entropy_one_hot_and_uniform():
    assert torch.equal(attention_entropy(torch.eye(10)), torch.zeros(10))
    assert torch.allclose(attention_entropy(torch.full((3, 10), 0.1)),
                          torch.full((3,), math.log(10)))


def test_distance_identity_uniform_and_loops():
    eye = torch.eye(17).expand(2, 4, 17, 17)
    assert torch.equal(attention_distance(eye, 4), torch.zeros(2, 4, dtype=torch.float64))
    u = torch.full((17, 17), 1 / 17)
    pos = token_positions(4, 4)
    assert attention_distance(u, 4).item() == pytest.approx(torch.cdist(pos, pos).mean().item())
    torch.manual_seed(0)
    w = torch.randn(10, 10).softmax(-1)
    assert attention_distance(w, 3).item() == pytest.approx(naive_distance(w, 3))
    # the class token's column does not count: moving all weight to it leaves the patch rows'
    # distance unchanged
    w2 = w.clone(); w2[1:, 0] = 5.0; w2 = w2 / w2.sum(-1, keepdim=True)
    assert attention_distance(w2, 3).item() == pytest.approx(naive_distance(w, 3))
    # without a class token, a 3x3 grid's neighbour of the centre is one patch away
    w3 = torch.zeros(9, 9); w3[:, 4] = 1.0
    assert attention_distance(w3, 2, cls_token=False).item() == pytest.approx(
        sum(2 * math.hypot(r - 1, c - 1) for r in range(3) for c in range(3)) / 9)


def test_shares():
    own, nb = locality_shares(torch.eye(17))
    assert (own.item(), nb.item()) == (1.0, 0.0)
    own, nb = locality_shares(torch.full((17, 17), 1 / 17))
    assert (own.item() == pytest.approx(1 / 16)
            and nb.item() == pytest.approx((4 * 3 + 8 * 5 + 4 * 8) / 16 / 16))


def test_rollout():
    eye = torch.eye(10).expand(3, 2, 10, 10)
    assert torch.equal(attention_rollout([eye, eye]),
                       torch.eye(10, dtype=torch.float64).expand(3, 10, 10))
    torch.manual_seed(0)
    a, b = torch.randn(2, 1, 2, 10, 10).softmax(-1)
    half = lambda m: 0.5 * m.double().mean(1) + 0.5 * torch.eye(10, dtype=torch.float64)
    r = attention_rollout([a, b])
    assert (torch.allclose(r, half(b) @ half(a))
            and torch.allclose(r.sum(-1), torch.ones(1, 10, dtype=torch.float64)))
    assert torch.allclose(rollout_cls_map(r).sum((-2, -1)), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-empty"): attention_rollout([])
    with pytest.raises(ValueError, match="all attention maps"):
        attention_rollout([a, torch.rand(1, 2, 5, 5)])


def test_cls_attention_and_pixels():
    w = torch.zeros(1, 2, 5, 5); w[:, :, 0, 3] = 1.0; w[:, :, 1:, 0] = 1.0
    g = cls_attention([w])
    assert g.shape == (1, 2, 2) and g[0, 1, 0] == 1.0 and g.sum() == 1.0
    assert to_pixels(g[0], 3).shape == (6, 6) and to_pixels(g[0], 3)[5, 0] == 1.0


def test_bad_shapes():
    with pytest.raises(ValueError, match="square grid"): attention_distance(torch.eye(16), 2)
    with pytest.raises(ValueError, match=r"\[..., N, N\]"): locality_shares(torch.ones(3, 4))


def test_stats_on_models():
    torch.manual_seed(0)
    m = create_model("sl_vit", 10, 16, preset="tiny", in_chans=1).eval()
    st = attention_stats(m.attention_maps(torch.randn(2, 1, 16, 16)), 2)
    assert all(v.shape == (2, 4) for v in st.values())
    # LSA masks the diagonal
    assert torch.equal(st["self"], torch.zeros(2, 4, dtype=torch.float64))
    assert (st["entropy"] <= math.log(65) + 1e-6).all() and (st["entropy"] > 0).all()
    v = create_model("vit", 10, 16, preset="tiny", in_chans=1).eval()
    assert (attention_stats(v.attention_maps(torch.randn(2, 1, 16, 16)), 2)["self"] > 0).all()


def _attention_with(m: nn.Module, x: torch.Tensor, tau: torch.Tensor) -> list[torch.Tensor]:
    "Each block's attention weights recomputed by hand: softmax(q kᵀ / τ), LSA's mask if on."
    maps, z = [], m.embed(x)
    for block, t in zip(m.blocks, tau.float()):
        a = block.attn
        qkv = a.qkv(block.norm1(z)).unflatten(-1, (3, a.heads, a.head_dim))   # [B, N, 3, h, d]
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)     # [B, h, N, d]
        logits = q @ k.transpose(-2, -1) / t[:, None, None]
        if a.diag_mask: logits = logits.masked_fill(torch.eye(z.shape[1], dtype=bool), -math.inf)
        maps.append(logits.softmax(-1))
        z = block(z)
    return maps


@pytest.mark.parametrize("name", ["vit", "sl_vit"])
def test_temperatures_are_the_taus_the_attention_divides_by(name):
    "`temperatures` reports, per block and head, the τ that each attention softmax divides by."
    torch.manual_seed(0)
    m = create_model(name, 10, 16, preset="tiny", in_chans=1).eval()
    if name == "sl_vit":                                # learned: a different τ in every head
        for i, b in enumerate(m.blocks):
            b.attn.temperature.set_(torch.tensor([4.0, 2.0, 1.5, 8.0]) + i)
    tau = temperatures(m)
    assert tau.shape == (2, 4) and tau.dtype == torch.float64
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for got, want in zip(m.attention_maps(x), _attention_with(m, x, tau), strict=True):
            torch.testing.assert_close(got, want)


def test_effective_receptive_field():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 16, 16)
    m = create_model("vit", 10, 16, preset="tiny", in_chans=1); m.blocks = nn.ModuleList()
    e = effective_receptive_field(m, x, 9)                      # token (1, 1): pixels 2-3
    assert e.sum().item() == pytest.approx(1.0) and patch_share(e, 9, 2) == pytest.approx(1.0)
    assert e[2:4, 2:4].sum().item() == pytest.approx(1.0)
    full = create_model("vit", 10, 16, preset="tiny", in_chans=1)
    # attention mixes in other patches
    assert patch_share(effective_receptive_field(full, x, 9), 9, 2) < 1.0
    assert full.training                                        # mode restored
    with pytest.raises(ValueError, match="out of range"): effective_receptive_field(m, x, 64)


def test_results(tmp_path):
    for s, acc in ((0, 0.5), (1, 0.7)):
        run = dict(config=dict(model="vit", seed=s),
                   summary=dict(final_acc=acc, best_acc=acc + 0.1, epochs_done=2, train_time=3.0),
                   history=[dict(epoch=1, test_acc=acc, train_loss=1.0)])
        (tmp_path / f"vit_seed{s}.json").write_text(json.dumps(run))
    runs = load_results(tmp_path)
    assert [r["config"]["seed"] for r in runs] == [0, 1]
    s = summarise_runs(runs)
    assert (s["vit"]["n"] == 2 and s["vit"]["final"] == pytest.approx(60.0)
            and s["vit"]["best_std"] == pytest.approx(math.sqrt(200)))
    assert s["sl_vit"]["n"] == 0 and math.isnan(s["sl_vit"]["final"])
    md = ablation_markdown(s)
    assert ("| ViT | 2 | 60.00 ± 14.14 | 70.00 ± 14.14 | 3 |" in md
            and "| SL-ViT (SPT + LSA) | 0 | – | – | – |" in md)
    assert math.isnan(mean_std([1.0])[1]) and mean_std([])[2] == 0
    assert load_results(tmp_path / "missing") == []


def _run(model, seed, acc, depth=None):
    return dict(config=dict(model=model, seed=seed, depth=depth), history=[],
                summary=dict(final_acc=acc, best_acc=acc, epochs_done=1, train_time=1.0))


def test_paired_difference_pairs_by_seed_and_applies_the_2se_rule():
    # seeds spread widely (50-70%) but SL-ViT is +1 point on every seed: paired, that is clear
    runs = [_run("vit", s, a) for s, a in ((0, 0.5), (1, 0.7), (2, 0.6))]
    runs += [_run("sl_vit", s, a + d)
             for s, a, d in ((0, 0.5, 0.010), (1, 0.7, 0.012), (2, 0.6, 0.008))]
    p = paired_difference(runs, "sl_vit")
    assert (p["n"] == 3 and p["diff"] == pytest.approx(1.0)
            and p["se"] == pytest.approx(0.2 / math.sqrt(3)))
    assert p["verdict"].startswith("ahead")
    # pairs are made by seed, not by position: shuffling the list changes nothing
    assert paired_difference(runs[::-1], "sl_vit")["diff"] == pytest.approx(1.0)
    # a difference inside 2 SE is noise; one seed gives no verdict; depth is part of the pairing
    noisy = runs[:3] + [_run("sl_vit", s, a + d)
                        for s, a, d in ((0, 0.5, 0.02), (1, 0.7, -0.02), (2, 0.6, 0.01))]
    assert paired_difference(noisy, "sl_vit")["verdict"].startswith("within noise")
    assert paired_difference(runs[:1] + runs[3:4], "sl_vit")["verdict"] == "one seed: no conclusion"
    deep = [_run("vit", 0, 0.5, depth=4), _run("sl_vit", 0, 0.6, depth=6)]
    assert paired_difference(deep, "sl_vit")["n"] == 0


def test_chapter_answers_first_and_ends_with_checked_exercises():
    "Chapter 8: its first results table comes before its first `def`; it ends with exercises."
    from pathlib import Path
    nb = Path(__file__).resolve().parent.parent / "nbs" / "08_experiments.ipynb"
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    src = ["".join(c["source"]) for c in cells]

    def has_def(s):
        return any(line.lstrip().startswith(("def ", "class ")) for line in s.splitlines())

    def has_table(c):
        return any("|---" in "".join(o.get("data", {}).get("text/markdown", ""))
                   for o in c.get("outputs", []))

    first_def = next(i for i, (c, s) in enumerate(zip(cells, src))
                     if c["cell_type"] == "code" and has_def(s))
    first_table = next(i for i, c in enumerate(cells) if c["cell_type"] == "code" and has_table(c))
    assert first_table < first_def, (f"first results table at cell {first_table}, "
                                     f"after the first definition at cell {first_def}")
    ex = next(i for i, s in enumerate(src) if s.startswith("## Exercises"))
    folded = [i for i, (c, s) in enumerate(zip(cells, src)) if i > ex and c["cell_type"] == "code"
              and s.startswith("#| code-fold: true")
              and c["metadata"].get("jupyter", {}).get("source_hidden")]
    assert folded, "no folded solution cell (code-fold + source_hidden) after ## Exercises"
    assert all("test_fail(" in src[i + 1] for i in folded), "a solution's check proves no rejection"
