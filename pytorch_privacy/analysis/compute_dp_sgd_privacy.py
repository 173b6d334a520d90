r"""Privacy of a DP-SGD training run: ``python -m pytorch_privacy.analysis.compute_dp_sgd_privacy``.

This module is the command-line script; the library code lives in
:mod:`.compute_dp_sgd_privacy_lib` (``compute_dp_sgd_privacy`` is re-exported here).

Example (the settings of TF Privacy's MNIST tutorial)::

    python -m pytorch_privacy.analysis.compute_dp_sgd_privacy \
        --N=60000 --batch_size=256 --noise_multiplier=1.1 --epochs=60 --delta=1e-5

Assumptions, printed with the result: every step samples each of the ``N`` records
independently with probability ``q = batch_size / N`` (**Poisson sampling**), neighbouring
datasets differ by adding or removing one record, and the run has
``steps = ceil(epochs * N / batch_size)`` steps.  The epsilon uses the exact RDP of the subsampled
Gaussian (Mironov, Talwar, Zhang 2019) and the tight RDP-to-DP conversion (Balle et al. 2020;
Canonne, Kamath, Steinke 2020) with the order optimised continuously.  For comparison it also
prints the classic conversion :math:`\varepsilon = r(\alpha) + \log(1/\delta)/(\alpha - 1)`, i.e. the
moments accountant of Abadi et al. (2016).  With the settings above the tight conversion gives
about 2.60 and the classic one about 3.01 (the figure TF Privacy's README quotes).

A data loader that shuffles the data into fixed-size batches is **not** Poisson sampling; this
bound does not apply to it (record the run in a ``PrivacyLedger`` with ``sampling="shuffle"``
and analyse the ledger instead).
"""


from __future__ import annotations

import argparse
import math
import sys
import types
import warnings
from collections.abc import Sequence

from ._checks import check_sigma
from .compute_dp_sgd_privacy_lib import check_plan, classic_epsilon, compute_dp_sgd_privacy, epsilon_for

__all__ = ["compute_dp_sgd_privacy", "main"]

# old private names, kept for one release (use compute_dp_sgd_privacy_lib.check_plan / epsilon_for)
_check_plan = check_plan
_epsilon_for = epsilon_for


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the epsilon and the assumptions it rests on."""
    parser = argparse.ArgumentParser(
        prog="python -m pytorch_privacy.analysis.compute_dp_sgd_privacy",
        description="Epsilon of DP-SGD (Poisson sampling, add-or-remove-one neighbours) by exact RDP.",
    )
    parser.add_argument("--N", dest="n", type=int, required=True, help="number of training examples")
    parser.add_argument("--batch_size", type=int, required=True, help="expected batch size (q = batch_size / N)")
    parser.add_argument("--noise_multiplier", type=float, required=True, help="noise stddev / clip norm")
    parser.add_argument("--epochs", type=float, required=True, help="number of epochs")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (default 1e-5)")
    args = parser.parse_args(argv)
    try:
        q, steps, delta = check_plan(args.n, args.batch_size, args.epochs, args.delta)
        sigma = check_sigma(args.noise_multiplier)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 1/N warning is printed below
            eps, order = compute_dp_sgd_privacy(args.n, args.batch_size, sigma, args.epochs, delta)
            classic_eps, classic_lambda = classic_epsilon(q, sigma, steps, delta) if sigma > 0 else (math.inf, math.nan)
    except ValueError as exc:
        parser.error(str(exc))
        return 2  # pragma: no cover  (parser.error exits)
    print(
        f"DP-SGD with Poisson sampling rate q = {args.batch_size}/{args.n} = {100 * q:.4g}% and "
        f"noise_multiplier = {sigma:g}, iterated over {steps} steps ({args.epochs:g} epochs),"
    )
    print(f"satisfies differential privacy with eps = {eps:.4g} and delta = {delta:g}.")
    print(f"  optimal RDP order: {order:.4g}")
    print("  assumed: Poisson sampling (each record independently with probability q at every step),")
    print("           add-or-remove-one neighbouring datasets, steps = ceil(epochs * N / batch_size).")
    print("  conversion: exact RDP (Mironov-Talwar-Zhang 2019) + tight RDP->DP conversion (Balle et al. 2020).")
    print(
        f"  classic conversion (moments accountant, Abadi et al. 2016): eps = {classic_eps:.4g} "
        f"(order {classic_lambda + 1:.4g})"
    )
    if delta > 1.0 / args.n:
        print(f"  warning: delta = {delta:g} exceeds 1/N = {1.0 / args.n:.3g}; choose delta well below 1/N.")
    print("  note: shuffled fixed-size batches are NOT Poisson sampling; this bound does not cover them.")
    return 0


class _CallableModule(types.ModuleType):
    """This module shares its name with its main function (the lazy export map of
    ``pytorch_privacy.analysis`` fixes both).  Once the submodule has been imported, the import
    system binds ``pytorch_privacy.analysis.compute_dp_sgd_privacy`` to the *module*; making the
    module callable keeps ``from pytorch_privacy.analysis import compute_dp_sgd_privacy;
    compute_dp_sgd_privacy(...)`` working either way."""

    def __call__(self, *args, **kwargs):
        return compute_dp_sgd_privacy(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
