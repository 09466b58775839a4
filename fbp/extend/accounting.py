"""Privacy budget of DP-SGD, computed by Google's ``dp-accounting`` (RDP or PLD).

DP-SGD's step is a Poisson-subsampled Gaussian mechanism: each example joins a step's
batch with probability q = batch_size / n, and the clipped sum gets noise of standard
deviation σ·C. After ``steps`` steps the run is (ε, δ)-differentially private with
the ε that the accountant returns for the composition of ``steps`` such events
(add-or-remove-one neighbouring, as Opacus and TF Privacy use).

Training on shuffled fixed-size batches (``fbp.train.make_epoch``) is accounted the
same way, as Abadi et al. and the usual libraries do; this is the standard
approximation, exact only for Poisson sampling (``benchmarks/digits_dp.py`` samples
that way).

``dp-accounting`` is an optional dependency: ``pip install 'fbp[dp]'``.

Examples:
  >>> from fbp.extend.accounting import PrivacyAccountant
  >>> acc = PrivacyAccountant.for_batches(noise=1.1, batch_size=256, n=60000, delta=1e-5)
  >>> round(acc.epsilon(steps=60 * 234), 2)  # 60 epochs of 60000 examples
  2.59
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

METHODS = ("rdp", "pld")


def require() -> None:
    """Raise the one-line ImportError now if ``dp-accounting`` is missing (call it
    before training starts, so a run does not fail at its first epoch's ε)."""
    _dp_accounting()


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError:
        raise ImportError(
            "fbp.extend.accounting needs the dp-accounting package: pip install 'fbp[dp]'."
        ) from None
    return dp_accounting


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"accounting: {name} must be a number, got {value!r}.")
    return float(value)


def check_batches(batch_size: Any, n: Any) -> float:
    """The sampling rate ``batch_size / n``; ValueError unless 1 <= batch_size <= n."""
    for name, v in (("n", n), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"accounting: {name} must be a positive int, got {v!r} (sampling rate "
                "batch_size / n must be in (0, 1])."
            )
    if batch_size > n:
        raise ValueError(
            f"accounting: batch_size {batch_size} is larger than the data set (n={n}); "
            "the sampling rate batch_size / n must be in (0, 1]."
        )
    return batch_size / n


@dataclasses.dataclass(frozen=True)
class PrivacyAccountant:
    """ε after a number of DP-SGD steps, for fixed noise, sampling rate and δ.

    Args:
      noise: noise multiplier σ (>= 0; 0 gives ε = inf).
      sampling_rate: q, the probability that an example is in a step's batch, in (0, 1].
      delta: δ, in (0, 1) (usually well below 1/n).
      method: ``"rdp"`` (Rényi DP, Mironov 2017) or ``"pld"`` (privacy loss
        distributions, tighter).

    Raises:
      ValueError: an option out of range, naming it and the allowed values.
    """

    noise: float
    sampling_rate: float
    delta: float = 1e-5
    method: str = "rdp"

    def __post_init__(self):
        noise = _number("noise", self.noise)
        if not 0 <= noise < math.inf:
            raise ValueError(f"accounting: noise must be a finite number >= 0, got {self.noise!r}.")
        q = _number("sampling_rate", self.sampling_rate)
        if not 0 < q <= 1:
            raise ValueError(
                f"accounting: sampling_rate must be in (0, 1] (batch_size / n), "
                f"got {self.sampling_rate!r}."
            )
        d = _number("delta", self.delta)
        if not 0 < d < 1:
            raise ValueError(f"accounting: delta must be in (0, 1), got {self.delta!r}.")
        if self.method not in METHODS:
            raise ValueError(
                f"accounting: method must be one of {list(METHODS)}, got {self.method!r}."
            )

    @classmethod
    def for_batches(
        cls, *, noise: float, batch_size: int, n: int, delta: float = 1e-5, method: str = "rdp"
    ) -> PrivacyAccountant:
        """The accountant for batches of ``batch_size`` drawn from ``n`` examples."""
        return cls(noise, check_batches(batch_size, n), delta, method)

    def _event(self, steps: int):
        dpa = _dp_accounting()
        step = dpa.PoissonSampledDpEvent(self.sampling_rate, dpa.GaussianDpEvent(self.noise))
        return dpa.SelfComposedDpEvent(step, steps)

    def _fresh(self):
        dpa = _dp_accounting()
        return dpa.rdp.RdpAccountant() if self.method == "rdp" else dpa.pld.PLDAccountant()

    def epsilon(self, steps: int) -> float:
        """ε after ``steps`` steps (0 for no steps, inf without noise)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"accounting: steps must be an int >= 0, got {steps!r}.")
        if steps == 0:
            return 0.0
        if self.noise == 0:
            return math.inf
        acc = self._fresh()
        acc.compose(self._event(steps))
        return float(acc.get_epsilon(self.delta))

    def epsilons(self, epochs: int, steps_per_epoch: int) -> list[float]:
        """ε at the end of each epoch 1..epochs: what a runner logs per epoch."""
        return [self.epsilon(e * steps_per_epoch) for e in range(1, epochs + 1)]


def noise_for_epsilon(
    epsilon: float,
    *,
    sampling_rate: float,
    steps: int,
    delta: float = 1e-5,
    method: str = "rdp",
) -> float:
    """The smallest noise multiplier σ whose run of ``steps`` steps has ε <= ``epsilon``.

    Raises:
      ValueError: epsilon not > 0, or another option out of range.
    """
    eps = _number("epsilon", epsilon)
    if not 0 < eps < math.inf:
        raise ValueError(f"accounting: epsilon must be a finite number > 0, got {epsilon!r}.")
    PrivacyAccountant(1.0, sampling_rate, delta, method)  # validates the rest
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"accounting: steps must be an int >= 1, got {steps!r}.")
    dpa = _dp_accounting()
    acc = PrivacyAccountant(1.0, sampling_rate, delta, method)
    return float(
        dpa.calibrate_dp_mechanism(
            acc._fresh,
            lambda s: PrivacyAccountant(s, sampling_rate, delta, method)._event(steps),
            eps,
            delta,
            dpa.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    )
