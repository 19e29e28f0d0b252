"Locality Self-Attention (chapter 4): fused path vs an explicit reference, mask, temperature, precision, bad input."
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitsd_nbdev.lsa import (LearnedTemperature, LocalitySelfAttention, SelfAttention, attention,
                             attention_entropy, attention_weights, locality_attention)
from vitsd_nbdev.training import param_groups
from vitsd_nbdev.vit import create_model


def reference(q, k, v, temperature=None, diag_mask=False):
    "Explicit softmax(q kᵀ / τ) v with the diagonal set to -inf when masked."
    tau = math.sqrt(q.shape[-1]) if temperature is None else temperature
    tau = torch.as_tensor(tau, dtype=q.dtype).reshape(-1, 1, 1)
    logits = (q @ k.transpose(-2, -1)) / tau
    if diag_mask:
        logits = logits.masked_fill(torch.eye(q.shape[-2], dtype=torch.bool), float("-inf"))
    return logits.softmax(-1) @ v


def reference_module(m, x):
    "SelfAttention's forward written out with `reference`."
    B, N, _ = x.shape
    q, k, v = (x @ m.qkv.weight.T).reshape(B, N, 3, m.heads, m.head_dim).permute(2, 0, 3, 1, 4)
    o = reference(q, k, v, m.temperature() if m.temperature is not None else None, m.diag_mask)
    return o.transpose(1, 2).reshape(B, N, -1) @ m.proj.weight.T + m.proj.bias


def qkv(B=2, heads=4, N=9, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, N, d, generator=g, dtype=dtype) for _ in range(3)]


TAUS = [None, torch.tensor([0.5, 1.0, 2.0, 4.0])]


@pytest.mark.parametrize("dtype,eps", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("diag_mask", [False, True])
@pytest.mark.parametrize("tau", TAUS)
def test_locality_attention_matches_reference(dtype, eps, diag_mask, tau):
    q, k, v = qkv(dtype=dtype)
    t = math.sqrt(q.shape[-1]) if tau is None else tau.to(dtype)
    out = locality_attention(q, k, v, t, diag_mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference(q, k, v, t, diag_mask), atol=eps, rtol=0)


def test_standard_attention_and_the_unmasked_sqrt_dk_case_agree():
    q, k, v = qkv()
    torch.testing.assert_close(attention(q, k, v), reference(q, k, v), atol=1e-5, rtol=0)
    torch.testing.assert_close(locality_attention(q, k, v, math.sqrt(8), diag_mask=False), attention(q, k, v), atol=1e-6, rtol=0)
    torch.testing.assert_close(locality_attention(q, k, v, torch.tensor(math.sqrt(8)), diag_mask=False), attention(q, k, v), atol=1e-6, rtol=0)


def test_masked_call_runs_on_the_fused_cpu_kernel():
    q, k, v = qkv()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only the fused kernel allowed: no fallback to the math path
        out = locality_attention(q, k, v, TAUS[1])
    torch.testing.assert_close(out, reference(q, k, v, TAUS[1], True), atol=1e-5, rtol=0)


def test_diagonal_gets_exactly_zero_weight():
    q, k, v = qkv()
    w = attention_weights(q, k, TAUS[1], diag_mask=True)
    assert w.diagonal(dim1=-2, dim2=-1).abs().max().item() == 0.0
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert (attention_weights(q, k).diagonal(dim1=-2, dim2=-1) > 0).all()
    # the output of row i ignores v_i entirely, and depends on every other v_j
    v2 = v.clone()
    v2[:, :, 4] += 100.0
    out, out2 = locality_attention(q, k, v, 2.0), locality_attention(q, k, v2, 2.0)
    assert torch.equal(out[:, :, 4], out2[:, :, 4])
    assert (out[:, :, :4] != out2[:, :, :4]).all()


def test_attention_weights_temperature_per_head_and_default():
    q, k, v = qkv()
    torch.testing.assert_close(attention_weights(q, k) @ v, reference(q, k, v), atol=1e-5, rtol=0)
    torch.testing.assert_close(attention_weights(q, k, TAUS[1]) @ v, reference(q, k, v, TAUS[1]), atol=1e-5, rtol=0)
    # a lower temperature gives a sharper (lower-entropy) distribution, head by head
    h_hot = attention_entropy(attention_weights(q, k, 8.0)).mean((0, 2))
    h_cold = attention_entropy(attention_weights(q, k, 0.5)).mean((0, 2))
    assert (h_cold < h_hot).all()


def test_entropy_ends():
    assert torch.equal(attention_entropy(torch.eye(6)), torch.zeros(6))
    torch.testing.assert_close(attention_entropy(torch.full((2, 3, 65), 1 / 65)), torch.full((2, 3), math.log(65)))
    assert attention_entropy(torch.rand(2, 3, 4, 5).softmax(-1)).shape == (2, 3, 4)


@pytest.mark.parametrize("dtype,tol_kernel,tol_total", [(torch.float16, 2e-3, 1e-2), (torch.bfloat16, 2e-2, 1e-1)])
def test_half_precision_is_finite_and_close(dtype, tol_kernel, tol_total):
    q, k, v = qkv()
    tau = TAUS[1]  # float32, like a learned parameter
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    out = locality_attention(qh, kh, vh, tau)
    assert out.dtype == dtype and out.isfinite().all()
    torch.testing.assert_close(out.float(), locality_attention(qh.float(), kh.float(), vh.float(), tau), atol=tol_kernel, rtol=0)
    torch.testing.assert_close(out.float(), locality_attention(q, k, v, tau), atol=tol_total, rtol=0)
    w = attention_weights(qh, kh, tau, diag_mask=True)
    assert w.dtype == dtype and w.isfinite().all() and (w.diagonal(dim1=-2, dim2=-1) == 0).all()


@pytest.mark.parametrize("diag_mask", [False, True])
@pytest.mark.parametrize("learned,form", [(False, "inverse"), (True, "inverse"), (True, "direct")])
def test_module_matches_reference_for_all_four_variants(diag_mask, learned, form):
    torch.manual_seed(0)
    m = SelfAttention(32, 4, 8, diag_mask=diag_mask, learned_temperature=learned, temperature_form=form)
    if learned:
        m.temperature.set_(torch.tensor([0.7, 1.5, 2.8, 5.0]))
        torch.testing.assert_close(m.temperature(), torch.tensor([0.7, 1.5, 2.8, 5.0]))
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(m(x), reference_module(m, x), atol=1e-5, rtol=0)
    m64, x64 = m.double(), x.double()
    torch.testing.assert_close(m64(x64), reference_module(m64, x64), atol=1e-12, rtol=0)


def test_defaults_and_temperature_parameter():
    lsa = LocalitySelfAttention(32, 4, 8)
    assert lsa.diag_mask and isinstance(lsa.temperature, LearnedTemperature)
    torch.testing.assert_close(lsa.temperature().detach(), torch.full((4,), math.sqrt(8)))
    assert torch.equal(lsa.temperature.scale.detach(), torch.full((4,), 8 ** -0.5))   # official: s = 1/τ
    direct = LocalitySelfAttention(32, 4, 8, temperature_form="direct")
    assert torch.equal(direct.temperature.tau.detach(), torch.full((4,), math.sqrt(8)))
    sa = SelfAttention(32, 4, 8)
    assert not sa.diag_mask and sa.temperature is None
    assert sa.qkv.bias is None and sa.qkv.weight.shape == (3 * 4 * 8, 32) and sa.proj.weight.shape == (32, 4 * 8)
    assert sum(p.numel() for p in lsa.parameters()) - sum(p.numel() for p in sa.parameters()) == 4
    assert list(dict(lsa.named_parameters())).count("temperature.scale") == 1
    assert not any("temperature" in n for n, _ in sa.named_parameters())
    with pytest.raises(ValueError, match="'inverse' or 'direct'"): LearnedTemperature(4, 8, "log")


def test_without_lsa_options_it_is_torch_multihead_attention():
    torch.manual_seed(0)
    sa = SelfAttention(48, heads=6, head_dim=8)
    mha = nn.MultiheadAttention(48, 6, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(sa.qkv.weight)
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.copy_(sa.proj.weight)
        mha.out_proj.bias.copy_(sa.proj.bias)
    x = torch.randn(3, 17, 48)
    out, w = sa(x, return_weights=True)
    out_mha, w_mha = mha(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, out_mha, atol=1e-5, rtol=0)
    torch.testing.assert_close(w, w_mha, atol=1e-6, rtol=0)
    # a learned temperature at its initial value changes nothing
    t_only = SelfAttention(48, 6, 8, learned_temperature=True)
    t_only.load_state_dict(sa.state_dict(), strict=False)
    torch.testing.assert_close(t_only(x), out, atol=1e-5, rtol=0)


def test_return_weights_are_the_ones_used():
    torch.manual_seed(0)
    m = LocalitySelfAttention(32, 4, 8)
    x = torch.randn(2, 10, 32)
    out, w = m(x, return_weights=True)
    assert w.shape == (2, 4, 10, 10) and (w.diagonal(dim1=-2, dim2=-1) == 0).all()
    torch.testing.assert_close(out, m(x))
    v = (x @ m.qkv.weight.T).reshape(2, 10, 3, 4, 8)[:, :, 2].transpose(1, 2)
    torch.testing.assert_close(m.proj((w @ v).transpose(1, 2).reshape(2, 10, 32)), out, atol=1e-5, rtol=0)


def test_gradient_reaches_the_temperature_and_matches_reference():
    torch.manual_seed(0)
    m = LocalitySelfAttention(32, 4, 8)
    x = torch.randn(2, 10, 32)
    m(x).square().mean().backward()
    g = m.temperature.scale.grad.clone()
    m.zero_grad()
    reference_module(m, x).square().mean().backward()
    assert (g != 0).all()
    torch.testing.assert_close(g, m.temperature.scale.grad, atol=1e-6, rtol=1e-4)


def test_autocast_bfloat16_cpu():
    torch.manual_seed(0)
    m = LocalitySelfAttention(32, 4, 8)
    x = torch.randn(2, 10, 32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        _, w = m(x, return_weights=True)
    assert out.dtype == torch.bfloat16 and out.isfinite().all() and w.isfinite().all()
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=0)
    out.float().square().mean().backward()
    g = m.temperature.scale.grad
    assert g.dtype == torch.float32 and g.isfinite().all() and (g != 0).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_in_half_precision(dtype):
    torch.manual_seed(0)
    m = LocalitySelfAttention(32, 4, 8)
    x = torch.randn(2, 10, 32)
    ref = m(x)
    out = m.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and out.isfinite().all()
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=0)


def one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_input_is_a_one_line_value_error():
    q, k, v = qkv()
    one_line_value_error(lambda: attention(q[0], k[0], v[0]), r"\[B, heads, N, head_dim\]")
    one_line_value_error(lambda: locality_attention(q, k[:, :, :5], v, 2.0), "same shape")
    one_line_value_error(lambda: locality_attention(q, k, v[:, :3], 2.0), "same shape")
    one_line_value_error(lambda: locality_attention(q, k, v.double(), 2.0), "dtype")
    one_line_value_error(lambda: locality_attention(q, k, v, torch.ones(3)), r"one entry per head \(4\)")
    one_line_value_error(lambda: locality_attention(q, k, v, torch.ones(4, 1)), r"one entry per head \(4\)")
    one_line_value_error(lambda: locality_attention(q, k, v, 0.0), "positive")
    one_line_value_error(lambda: attention_weights(q, k, torch.ones(5)), r"one entry per head \(4\)")
    one_line_value_error(lambda: attention_entropy(torch.tensor(1.0)), r"\[\.\.\., N\]")


def test_single_token_with_mask_is_refused_not_nan():
    q, k, v = qkv(N=1)
    one_line_value_error(lambda: locality_attention(q, k, v, 2.0), "at least 2 tokens")
    one_line_value_error(lambda: attention_weights(q, k, diag_mask=True), "at least 2 tokens")
    one_line_value_error(lambda: LocalitySelfAttention(8, 4, 8)(torch.randn(2, 1, 8)), "at least 2 tokens")
    assert torch.equal(locality_attention(q, k, v, 2.0, diag_mask=False), v)  # one token without the mask: itself
    # two tokens: each must attend entirely to the other
    q, k, v = qkv(N=2)
    assert torch.equal(locality_attention(q, k, v, 2.0), v.flip(-2))


def test_module_rejects_wrong_token_shape():
    m = LocalitySelfAttention(32, 4, 8)
    one_line_value_error(lambda: m(torch.randn(2, 10, 16)), r"\[B, N, 32\]")
    one_line_value_error(lambda: m(torch.randn(10, 32)), r"\[B, N, 32\]")

def test_bias_is_added_before_the_diagonal_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 6, 8).unbind(0)
    bias, tau = torch.randn(3, 6, 6), torch.tensor([1.0, 2.0, 3.0])
    w = attention_weights(q, k, tau, diag_mask=True, bias=bias)
    assert w.diagonal(dim1=-2, dim2=-1).abs().max().item() == 0.0
    manual = ((q @ k.transpose(-2, -1)) / tau[:, None, None] + bias).masked_fill(torch.eye(6, dtype=torch.bool), float("-inf")).softmax(-1)
    torch.testing.assert_close(w, manual)
    torch.testing.assert_close(locality_attention(q, k, v, tau, bias=bias), w @ v)
    torch.testing.assert_close(locality_attention(q, k, v, tau, diag_mask=False, bias=bias), attention_weights(q, k, tau, bias=bias) @ v)

def test_cached_mask_survives_inference_mode():
    q, k, v = torch.randn(3, 1, 2, 11, 4).unbind(0)
    with torch.inference_mode(): locality_attention(q, k, v, 2.0)      # first built under inference mode
    tau = torch.tensor([2.0, 2.0], requires_grad=True)
    locality_attention(q, k, v, tau).sum().backward()                 # reused in a training step
    assert tau.grad is not None and tau.grad.isfinite().all()


def _sharpening_steps(form: str, steps: int = 100) -> float:
    "Mean relative change of τ after AdamW steps (lr 1e-3, the trainer's groups) on a sharpening loss."
    torch.manual_seed(0)
    m = create_model("vit_lsa", num_classes=10, image_size=16, preset="tiny", in_chans=1,
                     temperature_form=form)
    x = torch.randn(8, 1, 16, 16)
    opt = torch.optim.AdamW(param_groups(m, 0.05), lr=1e-3)
    tau0 = torch.stack([b.attn.temperature().detach() for b in m.blocks])
    for _ in range(steps):
        z, loss = m.embed(x), 0.0
        for b in m.blocks:
            z, w = b(z, return_weights=True)
            loss = loss - w.square().sum(-1).mean()   # larger Σ p² = sharper attention
        opt.zero_grad(); loss.backward(); opt.step()
    tau = torch.stack([b.attn.temperature().detach() for b in m.blocks])
    return (tau / tau0 - 1).abs().mean().item()


def test_default_temperature_learns_at_the_official_rate():
    # the official multiplier s = 1/τ: 100 AdamW steps move τ by more than 10%;
    # a stored τ moves by at most about lr per step (100 * 1e-3 / 4 = 2.5%)
    assert _sharpening_steps("inverse") > 0.10
    assert _sharpening_steps("direct") < 0.03


@pytest.mark.parametrize("tau", [[1.0, 0.0, 2.0, 3.0], [1.0, -1.0, 2.0, 3.0], [1.0, float("nan"), 2.0, 3.0]])
def test_bad_temperature_tensor_is_refused(tau):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="positive and finite"):
        locality_attention(q, k, v, torch.tensor(tau))


def test_bf16_cpu_training_path_matches_the_fused_kernel():
    "bfloat16 training on a CPU takes explicit products: same values and gradients as the fused kernel."
    torch.manual_seed(0)
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in torch.randn(3, 2, 4, 17, 16).unbind(0))
    tau = torch.tensor([0.5, 1.0, 2.0, 4.0], requires_grad=True)
    out = locality_attention(q, k, v, tau)
    ref = torch.nn.functional.scaled_dot_product_attention(
        (q.detach() / tau.detach()[:, None, None]).to(q.dtype), k.detach(), v.detach(),
        attn_mask=~torch.eye(17, dtype=torch.bool), scale=1.0)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=0)
    out.float().sum().backward()
    assert tau.grad is not None and tau.grad.isfinite().all() and (tau.grad != 0).any()
    assert q.grad.isfinite().all()


@pytest.mark.parametrize("tau", [1.0, 2.5, "per_head"])
@pytest.mark.parametrize("diag_mask,with_bias", [(True, False), (False, False), (True, True), (False, True)])
def test_bf16_cpu_training_path_values_and_gradients(tau, diag_mask, with_bias):
    "The explicit bfloat16 path (τ in q, mask inside the product) against float64, values and gradients."
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 17, 16).unbind(0)
    t = torch.tensor([0.5, 1.0, 2.0, 4.0]) if tau == "per_head" else tau
    bias = torch.randn(1, 4, 17, 17) if with_bias else None
    qb, kb, vb = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    out = locality_attention(qb, kb, vb, t, diag_mask, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 17, 16)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (qb, kb, vb))
    t64 = t.double() if isinstance(t, torch.Tensor) else t
    logits = (q64 @ k64.transpose(-2, -1)) / torch.as_tensor(t64, dtype=torch.float64).reshape(-1, 1, 1)
    if bias is not None:
        logits = logits + bias.double()
    if diag_mask:
        logits = logits.masked_fill(torch.eye(17, dtype=torch.bool), float("-inf"))
    ref = logits.softmax(-1) @ v64
    torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=0)
    g = torch.randn_like(ref)
    out.backward(g.to(torch.bfloat16)); ref.backward(g)
    for a, b in [(qb, q64), (kb, k64), (vb, v64)]:
        torch.testing.assert_close(a.grad.double(), b.grad, atol=0.15, rtol=0.05)
    if diag_mask:  # row i does not see v_i: its gradient from row i's output is exactly zero
        vb.grad = None
        locality_attention(qb, kb, vb, t, True, bias)[:, :, 3].float().sum().backward()
        assert (vb.grad[:, :, 3] == 0).all()


def test_bf16_cpu_training_path_refuses_a_single_token_with_the_mask():
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in torch.randn(3, 2, 4, 1, 16).unbind(0))
    one_line_value_error(lambda: locality_attention(q, k, v, 4.0), "at least 2 tokens")
    assert locality_attention(q, k, v, 4.0, diag_mask=False).shape == (2, 4, 1, 16)
