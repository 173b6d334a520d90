"""Shared test settings: hypothesis profiles sized for a 2-core CI machine.

``ci`` (the default, and what CI runs): derandomised, so every run tests the same examples and a
failure reproduces exactly.  ``dev``: fewer examples.  ``explore``: random examples, more of
them, for hunting new counterexamples locally (``HYPOTHESIS_PROFILE=explore``).  ``mutation``:
used by ``tests/mutation/seed_bugs.py``.
"""

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=_SUPPRESS
)
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=200, deadline=None, suppress_health_check=_SUPPRESS)
# tests/mutation/seed_bugs.py: a failing property is reported, not shrunk (shrinking a seeded
# bug's counterexamples would take minutes and adds nothing to "caught")
settings.register_profile(
    "mutation",
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=_SUPPRESS,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """The ``gpu`` marker is the single switch for CUDA-only tests: they are skipped, with one
    reason, where no CUDA device exists (no per-file ``skipif`` needed)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _compiled_engine_backend():
    """The compiled engine is tested through ``torch.compile`` with the ``aot_eager`` backend: the
    same graph capture, ``vmap``/``grad`` tracing and AOT autograd as inductor, without the C++
    code generation (seconds per graph on 2 cores).  Inductor itself is tested explicitly
    (``tests/optimizer/test_compiled_engine.py``, marked slow)."""
    from pytorch_privacy.optimizer.engines import CompiledEngine

    old = CompiledEngine.default_backend
    CompiledEngine.default_backend = "aot_eager"
    yield
    CompiledEngine.default_backend = old
