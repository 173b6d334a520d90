r"""The matrix-factorisation (MF) query: clip and sum like DP-SGD, add noise correlated across steps.

With a strategy ``C`` (lower triangular, :mod:`pytorch_privacy.dp_query.matrix_factorization`) the query releases at step
``t``::

    sum_i clip_C(x_i)  +  sigma * C_clip * (C^{-1} z)_t,      z_0, z_1, ... i.i.d. N(0, I)

so the prefix sums of the releases are ``A (G + C^{-1} Z) = B (C G + Z)`` for the prefix-sum workload
``A = B C``: the Gaussian mechanism on ``C G`` (Denisov et al. 2022; Choquette-Choo et al. 2023).
``(C^{-1} z)_t`` is computed in a stream, with ``w = C^{-1} z`` solved row by row
(``w_t = (z_t - sum_{j<t} C[t, j] w_j) / C[t, t]``): a banded Toeplitz strategy keeps the last
``bands - 1`` vectors ``w``, a BLT strategy one buffer per decay rate, a dense one every ``w``.
That memory lives in the global state, so ``DPOptimizer.state_dict`` saves it and a resume continues
the same noise sequence (the generator state is saved too: no draw is ever reused).

With :func:`~.matrix_factorization.identity_strategy` the release is DP-SGD's, draw for draw
(:class:`~.gaussian_query.GaussianSumQuery` with ``stddev = sigma * C_clip`` and the same generator).

Each step returns a :class:`~.matrix_factorization_events.MatrixFactorizationStepEvent`; the ledger's
run grouper turns the steps into the run's event (:mod:`.matrix_factorization_events`).
"""

from __future__ import annotations

import warnings
from typing import Any

import attrs
import torch

from . import pytree
from .dp_query import check_stddev
from .gaussian_query import GaussianSumQuery
from .matrix_factorization import BandedToeplitzStrategy, BLTStrategy, DenseStrategy, Strategy, strategy_from_spec
from .matrix_factorization_events import MatrixFactorizationStepEvent
from .randomness import RandomSource

__all__ = ["MatrixFactorizationQuery", "MatrixFactorizationGlobalState", "correlated_noise_step"]


@attrs.frozen
class MatrixFactorizationGlobalState:
    """Global state of :class:`MatrixFactorizationQuery`.

    ``memory`` has a fixed length (``bands - 1``, the number of BLT buffers, or ``n - 1``); each
    entry is ``None`` (not yet used) or a list of tensors, one per leaf of the records, in the
    noise dtype.  ``step`` counts the releases so far.
    """

    l2_norm_clip: float
    noise_multiplier: float
    strategy: str
    partitions: int
    step: int
    memory: tuple

    @property
    def stddev(self) -> float:
        return self.noise_multiplier * self.l2_norm_clip


def _memory_length(strategy: Strategy) -> int:
    if isinstance(strategy, BandedToeplitzStrategy):
        return strategy.bands - 1
    if isinstance(strategy, BLTStrategy):
        return len(strategy.buffer_decay)
    if isinstance(strategy, DenseStrategy):
        return strategy.num_steps - 1
    raise TypeError(f"unsupported strategy type {type(strategy).__name__}")


def _axpy(acc: list[torch.Tensor], coef: float, xs: Any) -> None:
    """``acc -= coef * xs`` leaf-wise (in place)."""
    if coef != 0.0:
        torch._foreach_add_(acc, [x.to(a.device) for a, x in zip(acc, xs)], alpha=-coef)


def correlated_noise_step(strategy: Strategy, z: list[torch.Tensor], step: int, memory: tuple) -> tuple[list[torch.Tensor], tuple]:
    """``(w_t, new memory)`` for ``w = C^{-1} z`` at step ``step``, given this step's standard
    normals ``z`` (a list of tensors) and the memory of the previous steps (see
    :class:`MatrixFactorizationGlobalState`)."""
    if isinstance(strategy, BandedToeplitzStrategy):
        c = strategy.coefficients_
        w = [zi.clone() for zi in z]
        for j in range(1, min(step, len(c) - 1) + 1):
            _axpy(w, c[j], memory[j - 1])
        if c[0] != 1.0:
            torch._foreach_div_(w, c[0])
        return w, ((w,) + tuple(memory[:-1])) if memory else ()
    if isinstance(strategy, BLTStrategy):
        w = [zi.clone() for zi in z]
        if step > 0:
            for omega, buf in zip(strategy.output_scale, memory):
                _axpy(w, omega, buf)
        new = []
        for theta, buf in zip(strategy.buffer_decay, memory):
            if step == 0:
                new.append([wi.clone() for wi in w])
            else:
                new.append(torch._foreach_add(torch._foreach_mul([b.to(wi.device) for b, wi in zip(buf, w)], theta), w))
        return w, tuple(new)
    if isinstance(strategy, DenseStrategy):
        strategy.check_steps(step + 1)
        row = strategy.matrix(step + 1)[step]
        w = [zi.clone() for zi in z]
        for j in range(step):
            _axpy(w, float(row[j]), memory[j])
        if row[step] != 1.0:
            torch._foreach_div_(w, float(row[step]))
        mem = list(memory)
        if step < len(mem):
            mem[step] = w
        return w, tuple(mem)
    raise TypeError(f"unsupported strategy type {type(strategy).__name__}")


class MatrixFactorizationQuery(GaussianSumQuery):
    """Sum of records clipped to L2 norm ``l2_norm_clip``, plus the step's correlated MF noise.

    Args:
        l2_norm_clip: clip bound ``C_clip >= 0`` (global L2 norm of each record).
        noise_multiplier: ``sigma >= 0``, the stddev of ``z`` over the clip norm.  The run's privacy is
            the Gaussian mechanism with noise multiplier ``sigma / sens(C)``, ``sens`` computed from
            the ledger's sampling when the ledger is analysed (normalise ``C`` to column norm 1 to
            make ``sigma`` DP-SGD's noise multiplier for one participation).
        strategy: a :class:`~.matrix_factorization.Strategy` (banded Toeplitz, BLT or dense), or its
            JSON spec.
        partitions: the loader cycles over this many disjoint groups of the data, Poisson-sampling
            within the group of each step (banded sampling); 1 (default) for any other loader.  With
            ``partitions >= bands`` and a Poisson ledger, the run is accounted with amplification.
        generator: ``torch.Generator`` or :class:`~.randomness.RandomSource` for ``z`` (default: OS-seeded).
        secure_mode: draw ``z`` from the OS CSPRNG.
    """

    def __init__(
        self,
        l2_norm_clip: float,
        noise_multiplier: float,
        strategy: Strategy | str | dict,
        *,
        partitions: int = 1,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ):
        sigma = check_stddev(noise_multiplier, "noise_multiplier")
        clip = check_stddev(l2_norm_clip, "l2_norm_clip")
        super().__init__(clip, sigma * clip, generator=generator, secure_mode=secure_mode)
        if not isinstance(strategy, Strategy):
            strategy = strategy_from_spec(strategy)
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"partitions must be a positive integer, got {partitions!r}")
        if isinstance(strategy, BandedToeplitzStrategy) and not strategy.inverse_is_stable:
            warnings.warn(
                "this banded strategy's inverse grows exponentially (a root of c(x) inside the unit disk): "
                "the noise (C^{-1} z)_t explodes in long runs; use optimize_banded_toeplitz or another strategy",
                RuntimeWarning,
                stacklevel=2,
            )
        self.strategy = strategy
        self.noise_multiplier = sigma
        self.partitions = partitions
        self._memory_length = _memory_length(strategy)

    def initial_global_state(self) -> MatrixFactorizationGlobalState:
        return MatrixFactorizationGlobalState(
            self._l2_norm_clip, self.noise_multiplier, self.strategy.to_json(), self.partitions, 0,
            (None,) * self._memory_length,
        )

    def derive_metrics(self, global_state: MatrixFactorizationGlobalState) -> dict[str, float]:
        return {"l2_norm_clip": float(global_state.l2_norm_clip), "noise_multiplier": float(global_state.noise_multiplier)}

    def get_noised_result(self, sample_state, global_state: MatrixFactorizationGlobalState):
        if global_state.strategy != self.strategy.to_json():
            raise ValueError("the global state belongs to another strategy; build the query with the checkpoint's strategy")
        step = int(global_state.step)
        leaves, spec = pytree.flatten(sample_state)
        z = [self.generator.normal(leaf.shape, device=leaf.device, dtype=leaf.dtype) for leaf in leaves]
        w, memory = correlated_noise_step(self.strategy, z, step, tuple(global_state.memory))
        stddev = global_state.stddev
        noise = torch._foreach_mul(w, stddev) if w else []
        out = []
        for leaf, n in zip(leaves, noise):
            wide = leaf if leaf.dtype == n.dtype else leaf.to(n.dtype)
            s = wide + n
            dtype = leaf.dtype if leaf.is_floating_point() else torch.get_default_dtype()
            out.append(s if s.dtype == dtype else s.to(dtype))
        new_state = attrs.evolve(global_state, step=step + 1, memory=memory)
        return pytree.unflatten(out, spec), new_state, self.event(global_state)

    def event(self, global_state: MatrixFactorizationGlobalState) -> MatrixFactorizationStepEvent:
        """The step's event; ``starts=1`` on the first release of the noise sequence."""
        return MatrixFactorizationStepEvent(
            float(global_state.noise_multiplier), global_state.strategy, int(global_state.partitions),
            1 if int(global_state.step) == 0 else 0,
        )

