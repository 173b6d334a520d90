"""``pytorch-privacy privacy`` and ``noise``: planning questions about a DP-SGD training plan."""

from __future__ import annotations


from .audit import _plural


def _pld_epsilon(n: int, q: float, sigma: float, steps: int, delta: float) -> float:
    from ..analysis import compute_pld_from_ledger
    from ..dp_query import GaussianEvent, PrivacyLedger

    ledger = PrivacyLedger(n, q)
    ledger.record_sample(GaussianEvent(sigma), steps)
    return float(compute_pld_from_ledger(ledger).get_epsilon(delta))


def _cmd_privacy(args) -> int:
    import warnings

    from ..analysis.compute_dp_sgd_privacy_lib import check_plan, classic_epsilon, epsilon_for

    q, steps, delta = check_plan(args.N, args.batch_size, args.epochs, args.delta)
    sigma = args.noise_multiplier  # positive and finite (argparse type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1/N warning is printed below
        eps, order = epsilon_for(q, sigma, steps, delta)
        classic_eps, classic_lambda = classic_epsilon(q, sigma, steps, delta)
        eps_pld = _pld_epsilon(args.N, q, sigma, steps, delta) if args.accountant == "pld" else None
    print(
        f"DP-SGD with Poisson sampling rate q = {args.batch_size}/{args.N} = {100 * q:.4g}% and "
        f"noise_multiplier = {sigma:g}, iterated over {_plural(steps, 'step')} ({args.epochs:g} epochs),"
    )
    if args.accountant == "pld":
        print(f"satisfies differential privacy with eps = {eps_pld:.4g} and delta = {delta:g}.")
        print("  accountant: PLD (privacy loss distribution, pessimistic discretisation; --accountant pld)")
        print(f"  for comparison, RDP (tight conversion): eps = {eps:.4g} (order {order:.4g})")
    else:
        print(f"satisfies differential privacy with eps = {eps:.4g} and delta = {delta:g}.")
        print("  accountant: RDP (exact RDP of the subsampled Gaussian, Mironov-Talwar-Zhang 2019, with the")
        print(f"              tight RDP->DP conversion of Balle et al. 2020; --accountant rdp), order {order:.4g}")
        print(
            f"  classic conversion (moments accountant, Abadi et al. 2016): eps = {classic_eps:.4g} "
            f"(order {classic_lambda + 1:.4g})"
        )
    print("  assumed: Poisson sampling (each record independently with probability q at every step),")
    print("           add-or-remove-one neighbouring datasets, steps = ceil(epochs * N / batch_size).")
    if delta > 1.0 / args.N:
        print(f"  warning: delta = {delta:g} exceeds 1/N = {1.0 / args.N:.3g}; choose delta well below 1/N.")
    print("  note: shuffled fixed-size batches are NOT Poisson sampling; this bound does not cover them.")
    return 0


def _cmd_noise(args) -> int:
    from ..analysis import compute_noise
    from ..analysis.compute_dp_sgd_privacy_lib import check_plan

    sigma = compute_noise(args.N, args.batch_size, args.epsilon, args.epochs, args.delta)
    if args.accountant == "pld":
        # PLD is at least as tight as RDP: the RDP answer meets the target; bisect below it
        q, steps, delta = check_plan(args.N, args.batch_size, args.epochs, args.delta)
        hi, lo = sigma, sigma / 2.0
        while _pld_epsilon(args.N, q, lo, steps, delta) <= args.epsilon:
            hi, lo = lo, lo / 2.0
            if lo < 1e-2:
                raise ValueError(f"target epsilon {args.epsilon:g} is met by every noise multiplier down to {hi:g}")
        while hi - lo > 1e-3 * hi:
            mid = 0.5 * (lo + hi)
            if _pld_epsilon(args.N, q, mid, steps, delta) <= args.epsilon:
                hi = mid
            else:
                lo = mid
        sigma = hi
        accountant = "PLD accountant (privacy loss distribution; --accountant pld)"
    else:
        accountant = "RDP accountant (tight conversion; --accountant rdp)"
    print(
        f"noise multiplier {sigma:.4f} gives epsilon <= {args.epsilon:g} at delta={args.delta:g} for "
        f"{args.epochs:g} epochs of Poisson-sampled batches (q = {args.batch_size}/{args.N}, add/remove-one)"
    )
    print(f"  accountant: {accountant}")
    return 0
