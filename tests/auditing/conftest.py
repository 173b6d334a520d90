"""Shared fixtures of the auditing tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train several times faster on one intra-op thread on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
