"""Ghost-engine rules, one small module per layer family; each registers itself with
:func:`~pytorch_privacy.optimizer.engines.ghost_rules.register_ghost_rule` on import.

* :mod:`.conv`: ``nn.Conv3d`` (and the N-d patch unfolding the convolution rules share);
* :mod:`.conv_transpose`: ``nn.ConvTranspose1d/2d/3d``;
* :mod:`.embedding_bag`: ``nn.EmbeddingBag`` (modes ``sum`` and ``mean``);
* :mod:`.instance_norm`: ``nn.InstanceNorm1d/2d/3d`` with ``affine=True``;
* :mod:`.prelu`: ``nn.PReLU``.
"""

from . import conv, conv_transpose, embedding_bag, instance_norm, prelu  # noqa: F401

__all__ = ["conv", "conv_transpose", "embedding_bag", "instance_norm", "prelu"]
