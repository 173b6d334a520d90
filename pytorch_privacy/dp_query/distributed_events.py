"""Privacy events of the discrete and distributed sum mechanisms.

This module imports neither torch nor numpy (an auditor reads ledgers without them).  The
events register themselves on import; :func:`~.events.event_from_dict` imports this module when
it meets one of their kinds.  Their RDP is in :mod:`pytorch_privacy.analysis.distributed`.

* :class:`DiscreteGaussianEvent`: one discrete Gaussian ``N_Z(0, sigma^2)`` per coordinate
  added centrally to a sum of integer records of L2 norm at most ``l2_sensitivity``
  (:class:`~.discrete_gaussian_query.DiscreteGaussianSumQuery`).
* :class:`DistributedDiscreteGaussianEvent`: each of ``num_clients`` records carries its own
  discrete Gaussian noise share ``N_Z(0, local_sigma^2)`` per coordinate, summed by secure
  aggregation (:class:`~.distributed_discrete_gaussian_query.DistributedDiscreteGaussianSumQuery`).
* :class:`DistributedSkellamEvent`: each of ``num_clients`` records carries its own Skellam
  noise share of variance ``local_variance`` per coordinate
  (:class:`~.distributed_skellam_query.DistributedSkellamSumQuery`); the sum of the shares is
  Skellam of variance ``num_clients * local_variance``.

Sensitivities are stated per record, in the integer domain the noise is added in (after any
scaling and rounding), as bounds on one record's L2 (and L1) norm.  The analysis doubles them
under replace-one neighbours.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from .events import DpEvent, _finite_nonneg, _to_float

__all__ = ["DiscreteGaussianEvent", "DistributedDiscreteGaussianEvent", "DistributedSkellamEvent"]


def _check_count(instance, attribute, value):  # noqa: ARG001
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class DiscreteGaussianEvent(DpEvent):
    """Discrete Gaussian noise ``N_Z(0, sigma^2)`` on each coordinate of a sum of integer vectors,
    one record's L2 norm at most ``l2_sensitivity`` (Canonne, Kamath, Steinke 2020).

    ``sigma`` is the scale parameter of the discrete Gaussian (its variance is slightly below
    ``sigma^2``); ``sigma = 0`` means no noise.
    """

    kind: ClassVar[str] = "discrete_gaussian"
    l2_sensitivity: float = attrs.field(converter=_to_float, validator=_finite_nonneg("l2_sensitivity"))
    sigma: float = attrs.field(converter=_to_float, validator=_finite_nonneg("sigma"))


@attrs.frozen
class DistributedDiscreteGaussianEvent(DpEvent):
    """Sum of ``num_clients`` integer records, each with its own ``N_Z(0, local_sigma^2)`` noise
    per coordinate, over ``dimension`` coordinates (Kairouz, Liu, Steinke 2021).

    ``l2_sensitivity`` and ``l1_sensitivity`` bound one record's L2 and L1 norms (an integer
    vector of L2 norm ``c`` in ``d`` coordinates has L1 norm at most ``min(sqrt(d) c, c^2)``).
    The noise shares travel with the records: a neighbouring dataset with one record fewer also
    has one noise share fewer, which is why the analysis accounts these events under replace-one
    neighbours only (a fixed number of clients per round).
    """

    kind: ClassVar[str] = "distributed_discrete_gaussian"
    l2_sensitivity: float = attrs.field(converter=_to_float, validator=_finite_nonneg("l2_sensitivity"))
    l1_sensitivity: float = attrs.field(converter=_to_float, validator=_finite_nonneg("l1_sensitivity"))
    local_sigma: float = attrs.field(converter=_to_float, validator=_finite_nonneg("local_sigma"))
    num_clients: int = attrs.field(validator=_check_count)
    dimension: int = attrs.field(validator=_check_count)


@attrs.frozen
class DistributedSkellamEvent(DpEvent):
    """Sum of ``num_clients`` integer records, each with its own symmetric Skellam noise share
    (``Poisson(v/2) - Poisson(v/2)``, variance ``v = local_variance``) per coordinate (Agarwal,
    Kairouz, Liu 2021).  The shares sum to Skellam noise of variance ``num_clients * v``.

    ``l1_sensitivity`` and ``l2_sensitivity`` bound one record's L1 and L2 norms.  Accounted
    under replace-one neighbours only, for the reason given in
    :class:`DistributedDiscreteGaussianEvent`.
    """

    kind: ClassVar[str] = "distributed_skellam"
    l1_sensitivity: float = attrs.field(converter=_to_float, validator=_finite_nonneg("l1_sensitivity"))
    l2_sensitivity: float = attrs.field(converter=_to_float, validator=_finite_nonneg("l2_sensitivity"))
    local_variance: float = attrs.field(converter=_to_float, validator=_finite_nonneg("local_variance"))
    num_clients: int = attrs.field(validator=_check_count)
