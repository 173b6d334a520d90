r"""The moments accountant of Abadi et al. (2016), expressed through RDP.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang (2016), "Deep Learning with Differential
Privacy", track the log moment generating function of the privacy loss :math:`c`,

.. math::

    \alpha_{\mathcal M}(\lambda) = \log \mathbb E\big[e^{\lambda c}\big],

which composes additively (their Theorem 2.1), and convert with the tail bound

.. math::

    \delta = \min_\lambda \exp\big(\alpha(\lambda) - \lambda\varepsilon\big), \qquad
    \varepsilon = \min_\lambda \frac{\alpha(\lambda) + \log(1/\delta)}{\lambda}.

The log moment is a Rényi divergence in disguise (Mironov 2017):
:math:`\alpha(\lambda) = \lambda\, D_{\lambda+1}(P\|Q) = \lambda\,\mathrm{RDP}(\lambda+1)`, so the
moments accountant is the RDP accountant with Mironov's *classic* conversion
:math:`\varepsilon = r(a) + \log(1/\delta)/(a-1)` at order :math:`a = \lambda + 1`.  The tight
conversion of :mod:`.conversion` is never worse; :func:`get_privacy_spent_moments` is kept to
reproduce published moments-accountant figures (e.g. Abadi et al.'s
:math:`\varepsilon \approx 1.26` for ``q = 0.01``, ``sigma = 4``, ``T = 10000``, ``delta = 1e-5``,
which used integer :math:`\lambda \le 32`).

The log moments here use the exact RDP of :mod:`.rdp` (Mironov, Talwar, Zhang 2019), not the
asymptotic bound of Abadi et al.'s Lemma 3 nor their numerical integration.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from ._checks import check_delta, check_eps
from .orders import DEFAULT_ORDERS
from .rdp import compute_rdp

__all__ = ["DEFAULT_LAMBDAS", "compute_log_moments", "get_privacy_spent_moments"]

#: Default moment orders lambda: ``DEFAULT_ORDERS - 1`` (fractional lambdas are valid too).
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(a - 1.0 for a in DEFAULT_ORDERS)


def _check_lambdas(lambdas) -> np.ndarray:
    if lambdas is None:
        return np.asarray(DEFAULT_LAMBDAS, dtype=float)
    try:
        lam = np.atleast_1d(np.asarray(lambdas, dtype=float))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"lambdas must be real numbers > 0, got {lambdas!r}") from exc
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError("lambdas must be a non-empty scalar or 1-D sequence")
    if not np.all(np.isfinite(lam)) or np.any(lam <= 0):
        raise ValueError(f"moment orders lambda must be finite and > 0, got {lam.tolist()}")
    return lam


def compute_log_moments(
    q: float, noise_multiplier: float, steps: int, lambdas: Sequence[float] | None = None
) -> np.ndarray:
    r"""Log moments :math:`\alpha(\lambda) = \lambda\,\mathrm{RDP}(\lambda+1)` of ``steps`` steps of
    the Poisson-subsampled Gaussian mechanism (add-or-remove-one)."""
    lam = _check_lambdas(lambdas)
    return lam * np.atleast_1d(compute_rdp(q, noise_multiplier, steps, lam + 1.0))


def get_privacy_spent_moments(
    lambdas: Sequence[float],
    log_moments: Sequence[float],
    target_eps: float | None = None,
    target_delta: float | None = None,
) -> tuple[float, float, float]:
    r"""Abadi et al.'s tail bound; exactly one target.  Returns ``(eps, delta, opt_lambda)``.

    ``delta = min_l exp(alpha(l) - l * eps)`` (capped at 1) or
    ``eps = min_l (alpha(l) + log(1/delta)) / l``.
    """
    if (target_eps is None) == (target_delta is None):
        raise ValueError("give exactly one of target_eps and target_delta")
    lam = _check_lambdas(lambdas)
    try:
        lm = np.atleast_1d(np.asarray(log_moments, dtype=float))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"log_moments must be real numbers, got {log_moments!r}") from exc
    if lm.shape != lam.shape:
        raise ValueError(f"lambdas and log_moments must have the same length, got {lam.shape} and {lm.shape}")
    if np.any(np.isnan(lm)) or np.any(lm < 0):
        raise ValueError("log moments must be >= 0 (and not NaN)")
    if np.all(np.isinf(lm)):
        warnings.warn(
            "infinite privacy loss: the log moments are infinite at every lambda (zero noise or a "
            "non-private step)",
            RuntimeWarning,
            stacklevel=2,
        )
    if target_delta is not None:
        delta = check_delta(target_delta)
        eps = (lm - math.log(delta)) / lam
        i = int(np.argmin(eps))
        return float(max(eps[i], 0.0)), delta, float(lam[i])
    eps = check_eps(target_eps)
    with np.errstate(invalid="ignore"):
        log_delta = lm - lam * eps
    i = int(np.argmin(log_delta))
    return eps, float(min(math.exp(min(log_delta[i], 0.0)), 1.0)), float(lam[i])
