"""The pytree helpers (``dp_query.pytree``) and the deprecated ``dp_query.tree`` alias."""

from __future__ import annotations

import importlib
import sys
import warnings

import torch

from pytorch_privacy.dp_query import pytree


def test_flatten_round_trip_and_flat_dict():
    rec = {"a": torch.ones(2), "b": [torch.zeros(3), torch.full((1,), 2.0)]}
    leaves, spec = pytree.flatten(rec)
    assert len(leaves) == 3
    back = pytree.unflatten(leaves, spec)
    assert torch.equal(back["b"][1], rec["b"][1])
    assert pytree.is_flat_dict({"w": torch.ones(1)}) and not pytree.is_flat_dict(rec)


def test_global_norms_over_leaves():
    batch = [torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.tensor([[4.0], [2.0]])]
    assert pytree.global_norms(batch).tolist() == [5.0, 2.0]


def test_old_module_name_warns_and_aliases():
    sys.modules.pop("pytorch_privacy.dp_query.tree", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("pytorch_privacy.dp_query.tree")
    assert any(issubclass(w.category, DeprecationWarning) and "pytree" in str(w.message) for w in caught)
    assert old.global_norms is pytree.global_norms
