"""Attention vs PyTorch (CPU, float64): outputs and every gradient.

* ``torch.nn.functional.scaled_dot_product_attention`` against ``sdpa_forward`` /
  ``sdpa_backward`` in both memory modes: causal, boolean mask, key padding.
* ``torch.nn.MultiheadAttention(batch_first=True)`` against ``nn.MultiHeadAttention``
  with the weights converted by ``fbp.nn.mha.params_from_torch`` (transpose and
  split). PyTorch's boolean ``attn_mask`` and ``key_padding_mask`` mean "masked out",
  the negation of fbp's. PyTorch does not zero padded query rows, so the loss
  weights them by zero on both sides and only valid rows' outputs are compared.

The key bias's gradient is zero in exact arithmetic (softmax ignores a per-row shift);
both libraries return roundoff for it, compared with an absolute tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import nn
from fbp.nn.mha import params_from_torch
from fbp.testing import rel_error

torch = pytest.importorskip("torch")

TOL = 1e-10


def _t(a, grad=False):
    return torch.tensor(np.asarray(a), requires_grad=grad)


def _errors(ours: dict, theirs: dict) -> dict:
    return {k: rel_error(ours[k], theirs[k]) for k in ours}


@pytest.mark.parametrize("memory", ["standard", "linear"])
@pytest.mark.parametrize("kind", ["causal", "mask", "key-padding"])
def test_sdpa_matches_torch_scaled_dot_product_attention(kind, memory):
    b, h, t, s, d = 2, 3, 6, 6 if kind != "mask" else 9, 5
    rng = np.random.default_rng(0)
    q, k, v = (
        rng.normal(size=(b, h, t, d)),
        rng.normal(size=(b, h, s, d)),
        rng.normal(size=(b, h, s, d)),
    )
    do = rng.normal(size=(b, h, t, d))
    kw, torch_kw = {}, {}
    if kind == "causal":
        kw, torch_kw = dict(causal=True), dict(is_causal=True)
    elif kind == "mask":
        mask = rng.random((b, 1, t, s)) < 0.6
        mask[..., 0] = True  # every row keeps a key: torch gives NaN for empty rows
        kw, torch_kw = dict(mask=jnp.asarray(mask)), dict(attn_mask=_t(mask))
    else:
        lengths = np.array([6, 2])
        kw = dict(lengths=jnp.asarray(lengths))
        allowed = np.arange(s)[None, :] < lengths[:, None]
        torch_kw = dict(attn_mask=_t(allowed[:, None, None, :]))

    o, res = jax.jit(lambda q, k, v: sdpa_fwd(q, k, v, memory, kw))(q, k, v)
    dq, dk, dv = jax.jit(nn.sdpa_backward)(res, jnp.asarray(do))

    qt, kt, vt = _t(q, True), _t(k, True), _t(v, True)
    ot = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, **torch_kw)
    (ot * _t(do)).sum().backward()
    errors = _errors(
        {"o": o, "dq": dq, "dk": dk, "dv": dv},
        {
            "o": ot.detach().numpy(),
            "dq": qt.grad.numpy(),
            "dk": kt.grad.numpy(),
            "dv": vt.grad.numpy(),
        },
    )
    assert max(errors.values()) <= TOL, errors


def sdpa_fwd(q, k, v, memory, kw):
    return nn.sdpa_forward(q, k, v, memory=memory, block_size=4, **kw)


def _torch_mha(dim, heads, kdim=None, seed=0):
    torch.manual_seed(seed)
    module = torch.nn.MultiheadAttention(
        dim, heads, batch_first=True, kdim=kdim, vdim=kdim, dtype=torch.float64
    )
    with torch.no_grad():  # non-zero biases, so that their gradients are exercised
        for name, p in module.named_parameters():
            if "bias" in name:
                p.normal_()
    return module


def _torch_grads(module) -> dict:
    g = {n: p.grad.numpy() for n, p in module.named_parameters()}
    return {k: np.asarray(v) for k, v in params_from_torch(g).items()}


def _compare_mha(params, grads, module, y, y_t, qmask):
    ref = _torch_grads(module)
    errors = {k: rel_error(grads[k], ref[k]) for k in params if k != "b_k"}
    rows = np.asarray(qmask, bool)
    errors["y"] = rel_error(np.asarray(y)[rows], y_t.detach().numpy()[rows])
    assert max(errors.values()) <= TOL, errors
    np.testing.assert_allclose(grads["b_k"], ref["b_k"], atol=1e-12)


@pytest.mark.parametrize("memory", ["standard", "linear"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_self_attention_matches_torch_multihead_attention(causal, memory):
    batch, time, dim, heads = 3, 7, 8, 2
    module = _torch_mha(dim, heads)
    params = params_from_torch({k: v.detach().numpy() for k, v in module.state_dict().items()})
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(batch, time, dim)), rng.normal(size=(batch, time, dim))
    lengths = np.array([7, 4, 1])
    qmask = np.arange(time)[None, :] < lengths[:, None]

    layer = nn.MultiHeadAttention(heads, causal=causal, memory=memory, block_size=3)
    y, res = layer.forward(params, jnp.asarray(x), lengths=jnp.asarray(lengths))
    grads, dx = layer.backward(params, res, jnp.asarray(dy))

    x_t = _t(x, True)
    attn_mask = _t(np.triu(np.ones((time, time), bool), 1)) if causal else None
    y_t, _ = module(
        x_t, x_t, x_t, key_padding_mask=_t(~qmask), attn_mask=attn_mask, need_weights=False
    )
    (y_t * _t(dy * qmask[..., None])).sum().backward()
    _compare_mha(params, grads, module, y, y_t, qmask)
    assert rel_error(dx, x_t.grad.numpy()) <= TOL


@pytest.mark.parametrize("memory", ["standard", "linear"])
def test_cross_attention_matches_torch_multihead_attention(memory):
    batch, t, s, dim, dim_c, heads = 2, 5, 6, 8, 6, 4
    module = _torch_mha(dim, heads, kdim=dim_c, seed=1)
    params = params_from_torch({k: v.detach().numpy() for k, v in module.state_dict().items()})
    assert params["w_k"].shape == (dim_c, dim)
    rng = np.random.default_rng(2)
    x, ctx = rng.normal(size=(batch, t, dim)), rng.normal(size=(batch, s, dim_c))
    dy = rng.normal(size=(batch, t, dim))
    context_lengths = np.array([6, 3])

    layer = nn.MultiHeadAttention(heads, memory=memory, block_size=4)
    kw = dict(context_lengths=jnp.asarray(context_lengths))
    y, res = layer.forward(params, (jnp.asarray(x), jnp.asarray(ctx)), **kw)
    grads, (dx, dctx) = layer.backward(params, res, jnp.asarray(dy))

    x_t, c_t = _t(x, True), _t(ctx, True)
    pad = np.arange(s)[None, :] >= context_lengths[:, None]
    y_t, _ = module(x_t, c_t, c_t, key_padding_mask=_t(pad), need_weights=False)
    (y_t * _t(dy)).sum().backward()
    _compare_mha(params, grads, module, y, y_t, np.ones((batch, t), bool))
    assert rel_error(dx, x_t.grad.numpy()) <= TOL
    assert rel_error(dctx, c_t.grad.numpy()) <= TOL
