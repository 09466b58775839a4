"""Recurrent layers vs PyTorch (CPU, float64): outputs, final state and every gradient.

Weights convert by a transpose: torch's ``weight_ih_l0`` (G·H, in) is our ``w_ih.T``;
torch's two biases of SimpleRNN/LSTM sum to our single ``b``, GRU keeps both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import nn
from fbp.testing import rel_error

torch = pytest.importorskip("torch")

TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
OURS = {"rnn": nn.SimpleRNN, "lstm": nn.LSTM, "gru": nn.GRU}
TOL = 1e-10


def _to_torch(kind, module, params):
    """Copy our params into a torch module; the RNN/LSTM bias goes all into b_ih."""
    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    with torch.no_grad():
        module.weight_ih_l0.copy_(t(params["w_ih"].T))
        module.weight_hh_l0.copy_(t(params["w_hh"].T))
        if kind == "gru":
            module.bias_ih_l0.copy_(t(params["b_ih"]))
            module.bias_hh_l0.copy_(t(params["b_hh"]))
        else:
            module.bias_ih_l0.copy_(t(params["b"]))
            module.bias_hh_l0.zero_()


def _torch_grads(kind, module):
    g = {"w_ih": module.weight_ih_l0.grad.numpy().T, "w_hh": module.weight_hh_l0.grad.numpy().T}
    if kind == "gru":
        g.update(b_ih=module.bias_ih_l0.grad.numpy(), b_hh=module.bias_hh_l0.grad.numpy())
    else:  # d/d b_ih == d/d b_hh == d/d b
        np.testing.assert_allclose(module.bias_ih_l0.grad, module.bias_hh_l0.grad, rtol=1e-12)
        g["b"] = module.bias_ih_l0.grad.numpy()
    return g


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_matches_torch_outputs_final_state_and_gradients(kind, with_state):
    batch, time, n_in, hidden = 3, 9, 4, 5
    layer = OURS[kind](hidden)
    kx, kp, kd, ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (batch, time, n_in), jnp.float64)
    params = layer.init(kp, x)
    params = {
        k: v + 0.1 * jax.random.normal(jax.random.fold_in(kp, i), v.shape, v.dtype)
        for i, (k, v) in enumerate(sorted(params.items()))
    }
    dy = jax.random.normal(kd, (batch, time, hidden), jnp.float64)
    names = ("h", "c") if kind == "lstm" else ("h",)
    state = None
    if with_state:
        state = {
            k: 0.5 * jax.random.normal(jax.random.fold_in(ks, i), (batch, hidden))
            for i, k in enumerate(names)
        }

    y, res = layer.forward(params, x, state=state)
    dparams, dx = layer.backward(params, res, dy)
    final = res.carry if state is None else layer.next_state(state, res)

    module = TORCH[kind](n_in, hidden, batch_first=True, dtype=torch.float64)
    _to_torch(kind, module, params)
    x_t = torch.tensor(np.asarray(x), requires_grad=True)
    hx = None
    if with_state:
        h0 = torch.tensor(np.asarray(state["h"]))[None]
        hx = (h0, torch.tensor(np.asarray(state["c"]))[None]) if kind == "lstm" else h0
    y_t, h_n = module(x_t, hx)
    (y_t * torch.tensor(np.asarray(dy))).sum().backward()

    errors = {"y": rel_error(y, y_t.detach().numpy()), "dx": rel_error(dx, x_t.grad.numpy())}
    errors["h_n"] = rel_error(final["h"], (h_n[0] if kind == "lstm" else h_n)[0].detach().numpy())
    if kind == "lstm":
        errors["c_n"] = rel_error(final["c"], h_n[1][0].detach().numpy())
    for k, g in _torch_grads(kind, module).items():
        errors[k] = rel_error(dparams[k], g)
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"{kind} vs torch: {errors}"


def test_torch_lstm_weights_round_trip_by_transpose():
    """A torch LSTM's state_dict loads into our params by transposing and summing biases."""
    module = torch.nn.LSTM(3, 4, batch_first=True, dtype=torch.float64)
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    params = {
        "w_ih": jnp.asarray(sd["weight_ih_l0"].T),
        "w_hh": jnp.asarray(sd["weight_hh_l0"].T),
        "b": jnp.asarray(sd["bias_ih_l0"] + sd["bias_hh_l0"]),
    }
    x = np.random.default_rng(0).normal(size=(2, 6, 3))
    y = nn.LSTM(4).apply(params, jnp.asarray(x))
    y_t, _ = module(torch.tensor(x))
    assert rel_error(y, y_t.detach().numpy()) <= TOL
