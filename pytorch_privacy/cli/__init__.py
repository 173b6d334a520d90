"""``pytorch-privacy`` console script.

Subcommands:

* ``demo``     train a small CNN privately on scikit-learn's bundled ``digits`` images (no
  download), save the ledger, print the (epsilon, delta) bound.
* ``audit``    check a saved ledger file's integrity (``unsigned``, ``signature OK`` or
  ``tampered``), flag suspicious content, and recompute the bound: RDP, moments accountant and PLD
  side by side (torch is not imported).  Exit status: 0 verified or clean, 1 tampered, 2 refused
  or invalid, 3 unsigned and either suspicious or expected to be signed (``--key``).
* ``privacy``  epsilon of a DP-SGD training plan (like TF Privacy's compute_dp_sgd_privacy), by
  RDP or PLD (``--accountant``).
* ``noise``    the smallest noise multiplier meeting a target epsilon for a training plan.

``audit --plot eps.png`` (and ``demo --plot``) draws epsilon against steps for RDP and PLD at the
given delta; it needs matplotlib (``pip install 'pytorch_privacy[plot]'``).
"""

from __future__ import annotations

import sys
from typing import Sequence

from .args import ENGINE_CHOICES, build_parser
from .audit import _cmd_audit
from .demo_command import _cmd_demo
from .plan import _cmd_noise, _cmd_privacy
from .plot import epsilon_curve, plot_epsilon_curve

__all__ = ["main", "build_parser", "epsilon_curve", "plot_epsilon_curve", "ENGINE_CHOICES"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pytorch-privacy`` console script."""
    args = build_parser().parse_args(argv)
    handler = {"demo": _cmd_demo, "audit": _cmd_audit, "privacy": _cmd_privacy, "noise": _cmd_noise}[args.command]
    try:
        return handler(args)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pytorch-privacy {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"pytorch-privacy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pytorch-privacy {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        if args.command != "audit":
            raise
        # exit status 1 means "tampered": an unexpected failure must not read as it
        print(f"pytorch-privacy audit: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
