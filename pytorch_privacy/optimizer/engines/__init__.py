"""Per-example gradient engines behind one interface (see :mod:`.base`).

Registered engines, tried in priority order by ``select_engine(model)``:

* ``"ghost"`` (:class:`GhostEngine`, priority 20): ghost norms + book-keeping, never forms
  per-example gradients where that is cheaper; models built from supported layers only.
* ``"functorch"`` (:class:`FunctorchEngine`, priority 10): ``vmap(grad)``, any vmappable model.
* ``"compiled"`` (:class:`CompiledEngine`, priority 5, never picked by ``"auto"``): the
  functorch computation and the norms as one ``torch.compile`` graph on bucketed batch sizes.
* ``"graphed"`` (:class:`GraphedEngine`, priority 4, never picked by ``"auto"``): the
  functorch computation, the norms and the clipped sum replayed as CUDA graphs.
* ``"loop"`` (:class:`LoopEngine`, priority 0): one ``grad`` call per example, any model (used
  for ``nn.RNN``/``nn.GRU``, which do not vmap).
"""

from .base import (  # noqa: F401
    GradientEngine,
    MaterializedGradients,
    PerExampleGradients,
    accumulation_dtype,
    available_engines,
    batch_size_of,
    call_model,
    empty_gradients,
    get_engine,
    num_records_for,
    register_engine,
    select_engine,
)
from .functorch_engine import NOT_VMAPPABLE, FunctorchEngine  # noqa: F401
from .compiled_engine import CompiledEngine, PaddedGradients, bucket_size  # noqa: F401
from .graphed_engine import GraphedEngine, GraphedGradients  # noqa: F401
from .ghost_engine import GhostEngine, GhostGradients  # noqa: F401
from . import rules  # noqa: F401  (registers the per-layer ghost rules of .rules)
from .ghost_rules import LayerRule, NormPolicy, ghost_rule_for, ghost_rules, register_ghost_rule  # noqa: F401
from .loop_engine import LoopEngine  # noqa: F401
from .dp_layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention, DPRNNBase  # noqa: F401
from .swap import swap_to_dp_layers  # noqa: F401

__all__ = [
    "GradientEngine", "PerExampleGradients", "MaterializedGradients", "register_engine", "select_engine",
    "get_engine", "available_engines", "call_model", "FunctorchEngine", "GhostEngine", "GhostGradients",
    "LoopEngine", "LayerRule", "NormPolicy", "ghost_rule_for", "ghost_rules", "register_ghost_rule",
    "DPRNN", "DPGRU", "DPLSTM", "DPMultiheadAttention", "DPRNNBase", "NOT_VMAPPABLE",
    "swap_to_dp_layers", "CompiledEngine", "PaddedGradients", "bucket_size", "GraphedEngine", "GraphedGradients",
]
