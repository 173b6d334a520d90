"""Privacy loss distribution (PLD) accountant: tight (epsilon, delta) for composed mechanisms.

The privacy loss of a pair of output distributions ``(P, Q)`` is ``L = log(dP/dQ)(X)`` with
``X ~ P``.  Its *hockey-stick curve* ``delta(eps) = E_P[(1 - exp(eps - L))_+]`` is the smallest
delta for which the pair is (eps, delta)-indistinguishable.  Composing mechanisms adds their
independent privacy losses, so the PLD of a composition is the convolution of the PLDs
(Meiser and Mohammadi 2018; Sommer, Meiser, Mohammadi 2019; Koskela, Jalko, Honkela 2020).

How this package computes it
----------------------------
1. **Per-step curves.**  Every supported event is reduced to the hockey-stick curve of a
   *dominating pair* (Zhu, Dong, Wang 2022), in closed form and in log space.
   ``noise_multiplier`` is relative to the clip norm, i.e. the add/remove sensitivity (the
   convention of the whole package), so replacing a record moves a sum by up to 2.

   * Gaussian mechanism, shift ``s``: ``Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)`` with
     ``mu = s / sigma`` (Balle and Wang 2018).  Laplace: ``1 - exp((eps - s/b)/2)`` on
     ``|eps| <= s/b``.  Un-sampled: ``s = 1`` under add/remove, ``s = 2`` under replace-one.
   * Poisson subsampling, add/remove-one: the *remove* pair ``(q B1 + (1-q) B0, B0)`` and the
     *add* pair ``(B0, q B1 + (1-q) B0)``, with curves ``q d(log(1 + (e^eps - 1)/q))`` and
     ``(1 - e^eps (1-q)) d(log(q e^eps / (1 - e^eps (1-q))))`` in terms of the base curve ``d``
     (Balle, Barthe, Gaboardi 2018; Zhu et al. 2022).  For one pair of neighbouring datasets
     the direction is the same at every step, so each direction is composed on its own and the
     answer is the **maximum over the two directions** (as in dp-accounting).  A direction whose
     Chernoff bound is already below the other's exact answer is skipped.
   * Poisson subsampling of the Gaussian, replace-one: the symmetric mixture pair
     ``((1-q) N(0) + q N(-1), (1-q) N(0) + q N(1))`` (the replaced record at opposite ends of
     the clip ball), whose curve has a closed form through ``asinh``; this is the pair of
     dp-accounting's replace-one accountant and the tests check numerically that it dominates
     every other placement of the two records.  Laplace under replace-one uses the advanced
     joint convexity bound (Balle et al. 2018, Thm. 2) ``q [(1-b) d1(e0) + b d2(e0)]``,
     ``e^e0 = 1 + (e^eps - 1)/q``, ``b = e^eps / e^e0`` (shifts 1 and 2), valid but looser.
   * Sampling without replacement (replace-one): Balle et al.'s Theorem 10,
     ``q d2(log(1 + (e^eps - 1)/q))`` for ``eps >= 0`` (shift 2; attained by a concrete pair of
     datasets, so tight), and the dual identity ``delta(eps) = 1 - e^eps + e^eps delta(-eps)``
     of a symmetric relation below 0.
   * ``ShuffledEvent``: shuffling is **not** Poisson sampling and no amplification is claimed;
     it is accounted as ``ceil(steps / steps_per_epoch)`` compositions of the un-amplified event
     (one per epoch, parallel composition over its disjoint batches), under replace-one.

2. **Pessimistic discretisation ("connect the dots", Doroshenko, Ghazi, Kamath, Kumar,
   Manurangsi 2022).**  The curve is evaluated at grid points ``eps_k = k h`` and a discrete
   PLD on them is built whose curve is the chord interpolation of the true one in ``e^eps``.
   The true curve is convex in ``e^eps``, so the discrete curve lies above it everywhere: the
   discrete PLD dominates the mechanism and every reported epsilon or delta is an upper bound
   (dominance is preserved by composition).  Mass below the grid is lumped onto its first point
   (moved up); the curve value at the last point (below ``1e-200``) becomes mass at +infinity,
   counted in delta.  The grid is uniform (spacing ``h``) where the curve or its reverse
   exceeds ``1e-16``, i.e. where the mass is; in the tails beyond, each cell is as wide as lets
   the curve change by at most ``e^0.25`` (connect-the-dots is valid on any grid), so a fine
   ``h`` costs little and even single-step tails queried at delta = 1e-150 stay within ~1e-4.
   ``h`` is chosen from the per-step loss variance so that the pessimism is about ``1e-4``
   relative: finer than dp-accounting's fixed ``1e-4`` for small sampling rates (which makes
   it ~5% tighter at q = 1e-4), coarser for large per-step losses.  For very long
   heterogeneous compositions it is relaxed towards ``1e-3`` to bound the FFT work.

3. **Composition in the Fourier domain with exponential tilting.**  Each group of identical
   steps contributes one transform raised to the power ``count`` (accumulated as
   ``count * log|X|`` and ``count * arg X``, exact for integer counts), never step by step;
   heterogeneous groups multiply their transforms on a common grid (several groups per
   batched, threaded FFT); frequencies whose magnitude has underflowed are dropped from further
   work.  Every PMF is first tilted by
   ``exp(theta * loss)`` (an Esscher transform: the tilt of a convolution is the convolution of
   the tilts), with ``theta`` at the saddle point of the Chernoff bound for the requested
   (eps, delta).  The tail that decides delta then sits at the centre of the grid, so delta =
   1e-12 or 1e-100 is computed with floating-point *relative* accuracy instead of drowning in
   FFT round-off (dp-accounting's fixed-grid answer at delta = 1e-12 for the reference case
   below is 5% too high), and the grid only needs to cover the tilted bulk.

4. **No silent truncation.**  The composition window is the tilted mean +- a multiple of the
   tilted standard deviation, *verified* by Chernoff bounds computed from the discrete PMFs and
   widened until less than ``1e-15`` of the tilted mass escapes on each side.  Escaped mass
   above the window is added to delta, wrapped-around mass can only increase delta, and a
   bound on the FFT round-off (estimated from the negative entries of the inverse transform) is
   added too.  When an answer falls where the tilt is not accurate (the error terms exceed 1e-3
   of it) the tilt is re-centred and the composition redone.

Reference: ``q = 256/60000, sigma = 1.1, 14062 steps, delta = 1e-5`` gives 2.3818 (exact
value about 2.3816; dp-accounting 2.3817, RDP 2.60) in about 0.1 s; at delta = 1e-12, 4.1748
(PRV 4.1745 +- 0.01; dp-accounting 4.373).  ``benchmarks/bench_pld.py`` compares more cases.

Everything is numpy/scipy; no torch.

References: Meiser & Mohammadi, "Tight on budget? Tight bounds for r-fold approximate
differential privacy", CCS 2018.  Sommer, Meiser, Mohammadi, "Privacy loss classes: the central
limit theorem in differential privacy", PETS 2019.  Koskela, Jalko, Honkela, "Computing tight
differential privacy guarantees using FFT", AISTATS 2020.  Koskela, Jalko, Prediger, Honkela,
"Tight differential privacy for discrete-valued mechanisms and for the subsampled Gaussian
mechanism using FFT", AISTATS 2021.  Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the
dots: tighter discrete approximations of privacy loss distributions", PETS 2022.  Zhu, Dong,
Wang, "Optimal accounting of differential privacy via characteristic function", AISTATS 2022.
Balle, Barthe, Gaboardi, "Privacy amplification by subsampling: tight analyses via couplings
and divergences", NeurIPS 2018.  Balle & Wang, "Improving the Gaussian mechanism for
differential privacy: analytical calibration and optimal denoising", ICML 2018.  Lebeda,
Regehr, Kamath, Steinke, "Avoiding pitfalls for privacy accounting of subsampled mechanisms
under composition", 2024.

Layout (one concept a module, as dp-accounting separates its PLD modules): :mod:`.constants`,
:mod:`.curves` (per-event loss curves), :mod:`.discretisation` (connect the dots),
:mod:`.composition` (tilted FFT composition and read-out), :mod:`.parsing` (events and ledgers to
per-step specifications), :mod:`.accountant` (:class:`PLDAccountant` and the conveniences).
"""

from __future__ import annotations

from .accountant import PLDAccountant, compute_pld_from_ledger, pld_delta, pld_epsilon
from .constants import MAX_STEPS

__all__ = ["PLDAccountant", "pld_epsilon", "pld_delta", "compute_pld_from_ledger", "MAX_STEPS"]
