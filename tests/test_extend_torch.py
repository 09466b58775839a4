"""fbp.extend vs Opacus (DP-SGD, accountant) and BackPACK (per-example quantities,
GGN diagonal, Kronecker factors), on models with copied weights, in float64.

Conventions (mean losses of B examples): BackPACK's per-sample gradients are scaled
by 1/B (they sum to the batch gradient), fbp's are each example's own gradient (they
average to it), so ``grad_batch = g_b / B``, ``batch_l2 = ‖g_b‖² / B²`` and
``sum_grad_squared = Σ_b g_b² / B²`` and ``variance`` (BackPACK: of its scaled
per-sample gradients) is fbp's divided by B². Opacus's per-sample gradients are fbp's.
Torch layouts: Linear ``weight`` is ``w.T``; Conv2d ``weight`` (out, in, kh, kw) is
``w.transpose(3, 2, 0, 1)``; images are NCHW.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import extend, losses, nn
from fbp.extend import accounting, curvature, dp
from fbp.testing import rel_error

torch = pytest.importorskip("torch")
opacus = pytest.importorskip("opacus")
backpack = pytest.importorskip("backpack")

TOL = 1e-10


def _t(a):
    return torch.tensor(np.ascontiguousarray(a, dtype=np.float64))


def _mlp(loss_kind):
    out = 3
    ours = nn.Sequential([nn.Dense(6), nn.Tanh(), nn.Dense(5), nn.ReLU(), nn.Dense(out)])
    theirs = torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.Tanh(),
        torch.nn.Linear(6, 5),
        torch.nn.ReLU(),
        torch.nn.Linear(5, out),
    ).double()
    x = np.random.default_rng(0).normal(size=(8, 4))
    return ours, theirs, x, x, [0, 2, 4]


def _cnn(loss_kind):
    """Conv 3x3 SAME -> ReLU -> Conv 5x5 VALID (to 1x1) -> Flatten -> Dense."""
    ours = nn.Sequential(
        [
            nn.Conv2D(3, 3, padding="SAME"),
            nn.ReLU(),
            nn.Conv2D(4, 5, padding="VALID"),
            nn.Flatten(),
            nn.Dense(3),
        ]
    )
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 4, 5),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).double()
    x = np.random.default_rng(0).normal(size=(6, 5, 5, 2))
    return ours, theirs, x, x.transpose(0, 3, 1, 2), [0, 2, 4]


def _to_torch(w):
    w = np.asarray(w)
    return w.T if w.ndim == 2 else w.transpose(3, 2, 0, 1)


def _from_torch(t, like):
    t = t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)
    return t.T if like.ndim == 2 else t.transpose(2, 3, 1, 0)


def _build(make, loss_kind, seed=0):
    ours, theirs, x, x_torch, idx = make(loss_kind)
    x = jnp.asarray(x)
    params = jax.tree.map(lambda v: v.astype(jnp.float64), ours.init(jax.random.key(seed), x))
    rng = np.random.default_rng(seed + 1)
    params = jax.tree.map(lambda v: v + 0.2 * rng.normal(size=v.shape), params)
    with torch.no_grad():
        for j in idx:
            theirs[j].weight.copy_(_t(_to_torch(params[str(j)]["w"])))
            theirs[j].bias.copy_(_t(params[str(j)]["b"]))
    batch = x.shape[0]
    if loss_kind == "ce":
        y = np.arange(batch) % 3
        ours_loss, theirs_loss = losses.softmax_cross_entropy, torch.nn.CrossEntropyLoss()
        y_torch = torch.tensor(y)
    else:
        y = rng.normal(size=(batch, 3))
        ours_loss, theirs_loss = losses.mse, torch.nn.MSELoss()
        y_torch = _t(y)
    xt = _t(x_torch).requires_grad_(True)  # Opacus' full backward hooks want an input grad
    return ours, theirs, params, x, xt, jnp.asarray(y), y_torch, ours_loss, theirs_loss, idx


# ----------------------------------------------------------------------------- Opacus


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_clipped_sum_and_dp_gradient_match_opacus_without_noise(make):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    ours, theirs, params, x, xt, y, yt, loss, tloss, idx = _build(make, "ce")
    clip, batch = 0.3, x.shape[0]
    gsm = GradSampleModule(theirs)
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=batch,
    )
    tloss(gsm(xt), yt).backward()
    opt.pre_step()  # clip, accumulate, add (zero) noise, divide by the batch size
    out = jax.jit(dp.clipped_sum(ours, loss, clip=clip))(params, x, y)
    _, grads = jax.jit(dp.grad_fn(ours, loss, clip=clip, noise=0.0))(params, x, y)
    assert float(jnp.min(out.factors)) < 1  # some examples are clipped
    # Opacus clips by min(1, C / (‖g_b‖ + 1e-6)); with that factor on fbp's per-example
    # gradients the sums agree to 1e-10, and fbp's exact min(1, C / ‖g_b‖) to ~1e-6
    _, g = jax.jit(extend.per_example_grads(ours, loss))(params, x, y)
    c = jnp.minimum(1.0, clip / (out.norms + 1e-6))
    same_rule = jax.tree.map(lambda v: jnp.einsum("b,b...->...", c, v), g)
    for j in idx:
        m, key = theirs[j], str(j)
        w_sum = _from_torch(m.weight.summed_grad, params[key]["w"])
        b_sum = m.bias.summed_grad.numpy()
        assert rel_error(same_rule[key]["w"], w_sum) < TOL
        assert rel_error(same_rule[key]["b"], b_sum) < TOL
        assert rel_error(out.summed[key]["w"], w_sum) < 1e-5
        assert rel_error(out.summed[key]["b"], b_sum) < 1e-5
        w_grad = _from_torch(m.weight.grad, params[key]["w"])
        assert rel_error(jax.tree.map(lambda v: v / batch, same_rule[key]["w"]), w_grad) < TOL
        assert rel_error(grads[key]["w"], w_grad) < 1e-5
        assert rel_error(grads[key]["b"], m.bias.grad.numpy()) < 1e-5


def test_per_example_grads_match_opacus_grad_samples():
    from opacus import GradSampleModule

    ours, theirs, params, x, xt, y, yt, loss, tloss, idx = _build(_cnn, "mse")
    gsm = GradSampleModule(theirs)
    tloss(gsm(xt), yt).backward()
    _, g = extend.per_example_grads(ours, loss)(params, x, y)
    for j in idx:
        gs = theirs[j].weight.grad_sample.detach().numpy()
        ref = gs.transpose(0, 2, 1) if gs.ndim == 3 else gs.transpose(0, 3, 4, 2, 1)
        assert rel_error(g[str(j)]["w"], ref) < TOL
        assert rel_error(g[str(j)]["b"], theirs[j].bias.grad_sample.numpy()) < TOL


def test_rdp_epsilon_agrees_with_opacus_accountant():
    from opacus.accountants import RDPAccountant

    noise, q, steps, delta = 1.1, 256 / 60000, 1000, 1e-5
    theirs = RDPAccountant()
    theirs.history = [(noise, q, steps)]
    eps_theirs = theirs.get_epsilon(delta)
    eps_ours = accounting.PrivacyAccountant(noise, q, delta).epsilon(steps)
    # the same RDP bound, evaluated on different grids of orders
    assert abs(eps_ours - eps_theirs) < 0.03 * eps_theirs


# ----------------------------------------------------------------------------- BackPACK


@pytest.mark.parametrize("loss_kind", ["ce", pytest.param("mse", marks=pytest.mark.slow)])
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_first_order_quantities_and_diag_ggn_match_backpack(make, loss_kind):
    from backpack import backpack as bp_context
    from backpack import extend as bp_extend
    from backpack.extensions import (
        BatchGrad,
        BatchL2Grad,
        DiagGGNExact,
        SumGradSquared,
        Variance,
    )

    ours, theirs, params, x, xt, y, yt, loss, tloss, idx = _build(make, loss_kind)
    theirs, tloss = bp_extend(theirs), bp_extend(tloss)
    with bp_context(BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance()):
        tloss(theirs(xt), yt).backward()
    names = ["batch_grad", "batch_l2", "sum_grad_squared", "variance"]
    _, q = jax.jit(extend.quantities(ours, loss, names))(params, x, y)
    b = x.shape[0]
    for j in idx:
        m, key = theirs[j], str(j)
        gb = m.weight.grad_batch.detach().numpy()
        gb = gb.transpose(0, 2, 1) if gb.ndim == 3 else gb.transpose(0, 3, 4, 2, 1)
        assert rel_error(q["batch_grad"][key]["w"] / b, gb) < TOL
        assert rel_error(q["batch_grad"][key]["b"] / b, m.bias.grad_batch.numpy()) < TOL
        assert rel_error(q["batch_l2"][key]["w"] / b**2, m.weight.batch_l2.numpy()) < TOL
        assert rel_error(q["batch_l2"][key]["b"] / b**2, m.bias.batch_l2.numpy()) < TOL
        sgs = _from_torch(m.weight.sum_grad_squared, params[key]["w"])
        assert rel_error(q["sum_grad_squared"][key]["w"] / b**2, sgs) < TOL
        var = _from_torch(m.weight.variance, params[key]["w"])
        assert rel_error(q["variance"][key]["w"] / b**2, var) < 1e-8
    theirs.zero_grad()
    with bp_context(DiagGGNExact()):
        tloss(theirs(xt), yt).backward()
    diag = jax.jit(curvature.diag_ggn(ours, loss))(params, x, y)
    for j in idx:
        m, key = theirs[j], str(j)
        ref = _from_torch(m.weight.diag_ggn_exact, params[key]["w"])
        assert rel_error(diag[key]["w"], ref) < TOL
        assert rel_error(diag[key]["b"], m.bias.diag_ggn_exact.numpy()) < TOL


@pytest.mark.parametrize("loss_kind", ["ce", "mse"])
def test_kflr_factors_match_backpack(loss_kind):
    """Dense: BackPACK's KFLR [G, A] are fbp's G and A without the bias row/column.
    Conv: A agrees; BackPACK's G sums the output positions before the outer product
    (the bias GGN), fbp's G averages the outer products over positions (KFC), so only
    A is compared there."""
    from backpack import backpack as bp_context
    from backpack import extend as bp_extend
    from backpack.extensions import KFLR

    for make in (_mlp, _cnn):
        ours, theirs, params, x, xt, y, yt, loss, tloss, idx = _build(make, loss_kind)
        theirs, tloss = bp_extend(theirs), bp_extend(tloss)
        with bp_context(KFLR()):
            tloss(theirs(xt), yt).backward()
        factors = jax.jit(curvature.kfac_factors(ours, loss))(params, x, y)
        for j in idx:
            f, (G, A) = factors[(str(j),)], theirs[j].weight.kflr
            if make is _cnn and j != 4:
                # torch's unfold orders the patch (in, kh, kw); fbp's is (kh, kw, in)
                kh, kw, cin = params[str(j)]["w"].shape[:3]
                A = A.numpy().reshape(cin, kh, kw, cin, kh, kw).transpose(1, 2, 0, 4, 5, 3)
                A = A.reshape(kh * kw * cin, -1)
            else:
                assert rel_error(f.G, G.numpy()) < TOL
                assert rel_error(f.G, theirs[j].bias.kflr[0].numpy()) < TOL
            assert rel_error(f.A[:-1, :-1], np.asarray(A)) < TOL


# ----------------------------------------------------------------------------- attention


def _attention_lm():
    """Causal self-attention (2 heads) -> Dense(3) on (batch, T, 8), fbp and Opacus.

    Opacus's ``DPMultiheadAttention`` is sequence-first here: with ``batch_first=True``
    it merges the heads by a plain ``view`` of (batch·heads, T, d), which is not the
    standard layout. ``w_q = qlinear.weight.T`` and so on; ``w_o = out_proj.weight.T``.
    """
    from opacus.layers import DPMultiheadAttention

    class Theirs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = DPMultiheadAttention(8, 2)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):  # x: (T, batch, 8)
            t = x.shape[0]
            causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
            a, _ = self.mha(x, x, x, attn_mask=causal, need_weights=False)
            return self.head(a)

    torch.manual_seed(0)
    theirs = Theirs().double()
    m = theirs.mha
    lin = {"q": m.qlinear, "k": m.klinear, "v": m.vlinear, "o": m.out_proj}
    mha = {f"w_{n}": jnp.asarray(v.weight.detach().numpy().T) for n, v in lin.items()}
    mha.update({f"b_{n}": jnp.asarray(v.bias.detach().numpy()) for n, v in lin.items()})
    head = theirs.head
    params = {
        "0": mha,
        "1": {
            "w": jnp.asarray(head.weight.detach().numpy().T),
            "b": jnp.asarray(head.bias.detach().numpy()),
        },
    }
    ours = nn.Sequential([nn.MultiHeadAttention(2, causal=True), nn.Dense(3)])
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 6, 8)), rng.integers(0, 3, (5, 6))
    return ours, theirs, params, jnp.asarray(x), jnp.asarray(y)


def _torch_lm_loss(theirs, x, y):
    xt = _t(x).requires_grad_()  # (torch warns of a module hook with no input gradient)
    out = theirs(xt.transpose(0, 1)).transpose(0, 1)  # (batch, T, 3)
    return torch.nn.functional.cross_entropy(
        out.reshape(-1, 3), torch.tensor(np.asarray(y)).reshape(-1)
    )


def test_attention_grad_samples_match_opacus_dp_multihead_attention():
    from opacus import GradSampleModule

    ours, theirs, params, x, y = _attention_lm()
    gsm = GradSampleModule(theirs, batch_first=False)
    _torch_lm_loss(gsm, x, y).backward()
    _, g = extend.per_example_grads(ours, losses.causal_lm_loss)(params, x, y)
    m = theirs.mha
    for n, lin in {"q": m.qlinear, "k": m.klinear, "v": m.vlinear, "o": m.out_proj}.items():
        assert rel_error(g["0"][f"w_{n}"], lin.weight.grad_sample.numpy().transpose(0, 2, 1)) < TOL
        if n == "k":  # softmax ignores a bias added to every key: both are ~1e-18
            assert float(jnp.max(jnp.abs(g["0"]["b_k"]))) < 1e-14
            assert float(np.max(np.abs(lin.bias.grad_sample.numpy()))) < 1e-14
        else:
            assert rel_error(g["0"][f"b_{n}"], lin.bias.grad_sample.numpy()) < TOL
    assert rel_error(g["1"]["w"], theirs.head.weight.grad_sample.numpy().transpose(0, 2, 1)) < TOL


def test_attention_norms_match_opacus_ghost_clipping():
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    ours, theirs, params, x, y = _attention_lm()
    gsm = GradSampleModuleFastGradientClipping(
        theirs, batch_first=False, max_grad_norm=0.05, use_ghost_clipping=True
    )
    _torch_lm_loss(gsm, x, y).backward()
    out = dp.clipped_sum(ours, losses.causal_lm_loss, clip=0.05)(params, x, y)
    assert rel_error(out.norms, gsm.get_norm_sample().detach().numpy()) < TOL
    assert float(jnp.max(out.factors)) < 1  # every example is clipped
    c = gsm.get_clipping_coef().detach().numpy()  # C / (‖g_b‖ + 1e-6)
    assert rel_error(out.factors, c) < 1e-4
