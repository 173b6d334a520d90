"""Private training: :class:`DPOptimizer` and friends.

* :class:`DPOptimizer` / :class:`DPGaussianOptimizer` (:mod:`.dp_optimizer`): wrap any
  ``torch.optim.Optimizer``; per-example gradients, query (clip, sum, noise), ledger.
* :class:`PoissonSampler`, :class:`DPDataLoader`, :func:`split_into_physical_batches`
  (:mod:`.samplers`): Poisson sampling and physical-batch splitting.
* :class:`PrivacyBudget`, :class:`PrivacyBudgetExceeded` (:mod:`.budget`): budget enforcement.
* :class:`StepAccumulator`, ``JOINT`` / ``PER_PASS`` (:mod:`.step_accumulator`): the step accumulator (multi-pass steps, physical chunks).
* :class:`DistributedPoissonSampler`, :class:`DistributedDPDataLoader` (:mod:`.distributed`):
  data-parallel private training (a ``DistributedDataParallel`` model given to :class:`DPOptimizer`
  reduces clipped sums once and adds noise once per step); see docs/distributed.md.
* per-example gradient engines (:mod:`.engines`) and model validation (:mod:`.validation`).

Names load lazily (PEP 562), so importing a submodule does not import the others.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "DPOptimizer": ".dp_optimizer",
    "DPGaussianOptimizer": ".gaussian_optimizer",
    "PoissonSampler": ".samplers",
    "DPDataLoader": ".samplers",
    "split_into_physical_batches": ".samplers",
    "PrivacyBudget": ".budget",
    "PrivacyBudgetExceeded": ".budget",
    "StepAccumulator": ".step_accumulator",
    "JOINT": ".step_accumulator",
    "PER_PASS": ".step_accumulator",
    "GradientEngine": ".engines",
    "PerExampleGradients": ".engines",
    "MaterializedGradients": ".engines",
    "register_engine": ".engines",
    "select_engine": ".engines",
    "available_engines": ".engines",
    "DistributedPoissonSampler": ".distributed.sampler",
    "DistributedDPDataLoader": ".distributed.sampler",
    "DPLossScaler": ".distributed.precision",
    "DynamicDPLossScaler": ".distributed.precision",
    "DPFTRLOptimizer": ".ftrl_optimizer",
    "ftrl_epsilon": ".ftrl_optimizer",
    "ftrl_noise_multiplier": ".ftrl_optimizer",
    "plan_ledger": ".ftrl_optimizer",
    "FTRL_SAMPLING": ".ftrl_optimizer",
    "FixedOrderLoader": ".fixed_order",
    "FixedOrderSampler": ".fixed_order",
    "FIXED_ORDER": ".fixed_order",
    "DPMatrixFactorizationOptimizer": ".mf_optimizer",
    "BandedPoissonLoader": ".mf_optimizer",
    "BandedPoissonSampler": ".mf_optimizer",
    "validate_model": ".validation",
    "replace_batchnorm": ".validation",
}

__getattr__, __dir__, __all__ = lazy_attributes(__name__, globals(), _LAZY)

