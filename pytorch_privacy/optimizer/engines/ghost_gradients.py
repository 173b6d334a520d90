"""Per-record gradients held implicitly by the ghost engine (see :mod:`.ghost_engine`)."""

from __future__ import annotations

import torch
from torch import nn

from .base import PerExampleGradients, accumulation_dtype
from .ghost_rules import Contribution, NormPolicy, PerRecord, sum_sq_norms
from .ghost_taps import Call

__all__ = ["GhostGradients"]


class GhostGradients(PerExampleGradients):
    """Per-record gradients held implicitly as (activation, output gradient) pairs.

    :meth:`norms` and :meth:`weighted_sum` never form ``[R, *param.shape]`` for layers where
    the ghost route is cheaper; :meth:`materialize` does (for convenience and tests).
    """

    streams_by_name = True

    def __init__(self, trainable: dict[str, nn.Parameter], calls: list[Call], losses: torch.Tensor, microbatch: int, policy: NormPolicy):
        self.names = tuple(trainable)
        self._params = {n: (p.shape, p.dtype, p.device) for n, p in trainable.items()}
        self._calls = calls
        self._losses = losses
        self._microbatch = microbatch
        self._policy = policy
        self._records = losses.shape[0] // microbatch
        self._contribs: dict[str, list[Contribution]] | None = None
        self._norms: torch.Tensor | None = None
        self._materialized: dict[str, PerRecord] = {}

    @property
    def losses(self) -> torch.Tensor:
        return self._losses

    @property
    def num_records(self) -> int:
        return self._records

    def _contributions(self) -> dict[str, list[Contribution]]:
        if self._contribs is None:
            contribs: dict[str, list[Contribution]] = {n: [] for n in self.names}
            for call in self._calls:
                if call.grad is None:  # output did not reach the loss
                    continue
                grad = call.grad if call.out_dim == 0 else call.grad.movedim(call.out_dim, 0)
                parts = call.rule.contributions(
                    call.module, call.saved, grad, self._losses.shape[0], self._microbatch, frozenset(call.local)
                )
                for pn, c in parts.items():
                    contribs[call.local[pn]].append(c)
            self._calls = []  # free activations not captured by contributions
            self._contribs = contribs
        return self._contribs

    def _zeros(self, name: str, records: int | None = None) -> torch.Tensor:
        shape, dtype, device = self._params[name]
        lead = () if records is None else (records,)
        return torch.zeros(lead + tuple(shape), dtype=dtype, device=device)

    def norms(self) -> torch.Tensor:
        """Exact per-record L2 norms over all trainable parameters (ghost or materialised per
        layer, see :class:`~.ghost_rules.NormPolicy`); cached."""
        if self._norms is None:
            parts = []
            for name, cs in self._contributions().items():
                if not cs:
                    continue
                s, mat, merged = sum_sq_norms(cs, self._policy)
                self._contribs[name] = merged  # type: ignore[index]
                if mat is not None and self._policy.materialize_fits(mat.nbytes):
                    self._materialized[name] = mat
                parts.append(s)
            if not parts:
                dt = accumulation_dtype(next(iter(self._params.values()))[1]) if self._params else torch.float32
                sq = torch.zeros(self._records, dtype=dt, device=self._losses.device)
            elif len(parts) == 1:
                sq = parts[0]
            else:
                dt = parts[0].dtype
                sq = torch.stack([p if p.dtype == dt else p.to(dt) for p in parts]).sum(0)
            self._norms = sq.sqrt()
        return self._norms

    def weighted_sum(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """``sum_r c_r grad_r`` per parameter, by book-keeping (one matmul per layer use) or from
        per-layer gradients materialised by :meth:`norms`.  Records with ``c_r == 0`` contribute
        exact zeros even when their activations or gradients are not finite."""
        return self._weighted_sum(coefficients, self._mask_needed(), self.names)

    def weighted_sum_of_finite(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`weighted_sum` without masking: the caller checked that every norm is finite."""
        return self._weighted_sum(coefficients, False, self.names)

    def weighted_sum_of(self, coefficients: torch.Tensor, names, *, finite: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`weighted_sum` for ``names`` only, forming no other parameter's sum."""
        return self._weighted_sum(coefficients, False if finite else self._mask_needed(), names)

    def _mask_needed(self) -> bool:
        # masking costs a pass over the data; skip it when every record is known finite, which
        # is free to check on the CPU (on accelerators it would be a host sync: always mask)
        if self._norms is not None and self._norms.device.type == "cpu":
            return not bool(torch.isfinite(self._norms).all())
        return True

    def _weighted_sum(self, coefficients: torch.Tensor, mask: bool, names) -> dict[str, torch.Tensor]:
        if coefficients.shape != (self._records,):
            raise ValueError(f"coefficients must have shape [{self._records}], got {tuple(coefficients.shape)}")
        contribs = self._contributions()
        out = {}
        for name in names:
            cs = contribs[name]
            if name in self._materialized:
                out[name] = self._materialized[name].weighted_sum(coefficients, mask)
            elif not cs:
                out[name] = self._zeros(name)
            else:
                total = cs[0].weighted_sum(coefficients, mask)
                for c in cs[1:]:
                    total = total + c.weighted_sum(coefficients, mask)
                out[name] = total
        return out

    def materialize(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, cs in self._contributions().items():
            if name in self._materialized:
                out[name] = self._materialized[name].materialize()
            elif not cs:
                out[name] = self._zeros(name, self._records)
            else:
                total = cs[0].materialize()
                for c in cs[1:]:
                    total = total + c.materialize()
                out[name] = total
        return out
