"""Ghost-engine rules, one small module per layer family; each registers itself with
:func:`~pytorch_privacy.optimizer.engines.ghost_rules.register_ghost_rule` on import.

* :mod:`.linear`: ``nn.Linear``;
* :mod:`.conv`: ``nn.Conv1d/2d/3d`` (and the patch unfolding the convolution rules share);
* :mod:`.embedding`: ``nn.Embedding``;
* :mod:`.norm`: ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, eval-mode ``nn.BatchNorm*``;
* :mod:`.conv_transpose`: ``nn.ConvTranspose1d/2d/3d``;
* :mod:`.embedding_bag`: ``nn.EmbeddingBag`` (modes ``sum`` and ``mean``);
* :mod:`.instance_norm`: ``nn.InstanceNorm1d/2d/3d`` with ``affine=True``;
* :mod:`.prelu`: ``nn.PReLU``.
"""

from . import conv, conv_transpose, embedding, embedding_bag, instance_norm, linear, norm, prelu  # noqa: F401

__all__ = ["linear", "conv", "conv_transpose", "embedding", "embedding_bag", "norm", "instance_norm", "prelu"]
