"""Membership inference attacks on a trained classifier, in the shape of TF Privacy's
``membership_inference_attack`` and PyTorch-native.

Inputs are plain arrays or tensors -- per-example losses, or logits and labels, for the members
(training examples) and non-members (held-out examples) -- or a model, a loss and two loaders
(:func:`compute_attack_inputs`).  :func:`run_attacks` runs the chosen attacks on every slice of a
:class:`SlicingSpec` and returns :class:`~.mia_results.AttackResults` (AUC, attacker advantage,
TPR at FPR 1e-3 and 1e-2, and an epsilon lower bound with Clopper--Pearson confidence).

Attacks (:class:`AttackType`):

* ``threshold_loss``: member if the loss is low (Yeom, Giacomelli, Fredrikson, Jha 2018);
* ``threshold_confidence`` / ``threshold_true_class``: member if the largest softmax
  probability / the true class's probability is high (Salem et al. 2019);
* ``logistic_regression`` / ``mlp``: a classifier trained on half of the examples (features: loss,
  true-class log-probability, sorted log-softmax), scored on the other half (Shokri et al. 2017);
* ``lira_online`` / ``lira_offline``: the likelihood-ratio attack with shadow models
  (Carlini et al. 2022); needs ``AttackInputData.shadow`` (:func:`~.mia_attacks.train_shadow_models`).

An empirical epsilon is a *lower* bound for the training algorithm: a value above the ledger's
epsilon (at the same delta) is evidence of a bug; a value far below it is normal.
"""

from __future__ import annotations

import enum
from typing import Callable, Iterable, Sequence

import attrs
import numpy as np
import torch

from .mia_attacks import (
    ShadowModels,
    confidence_scores,
    lira_scores,
    lira_statistic,
    log_softmax_np,
    train_attacker,
    true_class_probabilities,
)
from ._model import evaluating
from .mia_results import DEFAULT_FPRS, AttackResults, evaluate_scores

__all__ = ["AttackType", "AttackInputData", "SlicingSpec", "compute_attack_inputs", "run_attacks"]


class AttackType(str, enum.Enum):
    """The attacks :func:`run_attacks` knows."""

    THRESHOLD_LOSS = "threshold_loss"
    THRESHOLD_CONFIDENCE = "threshold_confidence"
    THRESHOLD_TRUE_CLASS = "threshold_true_class"
    LOGISTIC_REGRESSION = "logistic_regression"
    MLP = "mlp"
    LIRA_ONLINE = "lira_online"
    LIRA_OFFLINE = "lira_offline"

    @property
    def is_trained(self) -> bool:
        return self in (AttackType.LOGISTIC_REGRESSION, AttackType.MLP)


def _as_array(name: str, value, ndim: int, dtype) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.double() if dtype is np.float64 else value
        value = value.numpy()
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if dtype is np.int64:
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
        return arr.astype(np.int64)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return -log_softmax_np(logits)[np.arange(labels.size), labels]


@attrs.frozen(eq=False)
class AttackInputData:
    """What the attacks see of a trained model: per-example losses and/or logits and labels, for
    members (``*_train``) and non-members (``*_test``).  Arrays or tensors; stored as numpy.

    A missing loss is the cross-entropy of the logits and labels.  A model that outputs
    probabilities can pass their logarithms as logits (the softmax of ``log p`` is ``p``).  ``shadow`` (for LiRA) holds
    shadow-model statistics on the members followed by the non-members, in that order
    (``train_shadow_models(..., data=(cat(x_train, x_test), cat(y_train, y_test)))``).
    """

    loss_train: np.ndarray | None = attrs.field(default=None, converter=lambda v: _as_array("loss_train", v, 1, np.float64))
    loss_test: np.ndarray | None = attrs.field(default=None, converter=lambda v: _as_array("loss_test", v, 1, np.float64))
    logits_train: np.ndarray | None = attrs.field(default=None, converter=lambda v: _as_array("logits_train", v, 2, np.float64))
    logits_test: np.ndarray | None = attrs.field(default=None, converter=lambda v: _as_array("logits_test", v, 2, np.float64))
    labels_train: np.ndarray | None = attrs.field(default=None, converter=lambda v: _as_array("labels_train", v, 1, np.int64))
    labels_test: np.ndarray | None = attrs.field(default=None, converter=lambda v: _as_array("labels_test", v, 1, np.int64))
    shadow: ShadowModels | None = None

    def __attrs_post_init__(self) -> None:
        pairs = [("loss", self.loss_train, self.loss_test), ("logits", self.logits_train, self.logits_test),
                 ("labels", self.labels_train, self.labels_test)]
        for name, a, b in pairs:
            if (a is None) != (b is None):
                raise ValueError(f"give both {name}_train and {name}_test, or neither")
        if self.loss_train is None and (self.logits_train is None or self.labels_train is None):
            raise ValueError("give losses (loss_train, loss_test) or logits and labels (to compute them)")
        for side in ("train", "test"):
            sizes = {n: getattr(self, f"{n}_{side}").shape[0] for n in ("loss", "logits", "labels")
                     if getattr(self, f"{n}_{side}") is not None}
            if len(set(sizes.values())) != 1:
                raise ValueError(f"the {side} arrays disagree on the number of examples: {sizes}")
            if next(iter(sizes.values())) == 0:
                raise ValueError(f"no {side} examples")
        if self.logits_train is not None and self.logits_train.shape[1] != self.logits_test.shape[1]:
            raise ValueError("logits_train and logits_test have different numbers of classes")
        if self.labels_train is not None:
            c = self.logits_train.shape[1] if self.logits_train is not None else None
            for lab in (self.labels_train, self.labels_test):
                if lab.min() < 0 or (c is not None and lab.max() >= c):
                    raise ValueError(f"labels must be in [0, {c}) (the logits' classes), got {lab.min()}..{lab.max()}")
        if self.shadow is not None:
            if not isinstance(self.shadow, ShadowModels):
                raise TypeError("shadow must be a ShadowModels (from train_shadow_models)")
            if self.shadow.stats.shape[1] != self.n_train + self.n_test:
                raise ValueError(f"shadow covers {self.shadow.stats.shape[1]} examples; expected members + "
                                 f"non-members = {self.n_train + self.n_test}")

    @property
    def n_train(self) -> int:
        return int((self.loss_train if self.loss_train is not None else self.labels_train).shape[0])

    @property
    def n_test(self) -> int:
        return int((self.loss_test if self.loss_test is not None else self.labels_test).shape[0])

    def get_loss(self, side: str) -> np.ndarray:
        """Per-example losses of ``side`` (``"train"`` or ``"test"``)."""
        loss = getattr(self, f"loss_{side}")
        if loss is None:
            loss = _cross_entropy(getattr(self, f"logits_{side}"), getattr(self, f"labels_{side}"))
        return loss

    def subset(self, train_index: np.ndarray, test_index: np.ndarray) -> "AttackInputData":
        """The same data restricted to some members and some non-members."""
        def pick(v, i):
            return None if v is None else v[i]

        shadow = None
        if self.shadow is not None:
            shadow = self.shadow.columns(np.r_[np.asarray(train_index), self.n_train + np.asarray(test_index)])
        return AttackInputData(
            pick(self.loss_train, train_index), pick(self.loss_test, test_index),
            pick(self.logits_train, train_index), pick(self.logits_test, test_index),
            pick(self.labels_train, train_index), pick(self.labels_test, test_index), shadow,
        )


@attrs.frozen
class SlicingSpec:
    """Which subsets to attack besides (or instead of) the whole data.

    Attributes:
        entire_dataset: attack all examples (slice ``"all"``).
        by_class: ``True`` for every class, an int ``k`` for classes ``0..k-1``, or a list of
            classes; needs labels.  A class slice holds the members and non-members of that label.
        by_loss_percentile: ``True`` for deciles, or the number of buckets: slices of the
            examples (members and non-members pooled) by percentile of their loss.
        min_examples: a slice with fewer members or non-members than this is skipped (and
            listed in ``AttackResults.skipped``).
    """

    entire_dataset: bool = True
    by_class: bool | int | Sequence[int] = False
    by_loss_percentile: bool | int = False
    min_examples: int = 4


def _slices(data: AttackInputData, spec: SlicingSpec) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    if spec.entire_dataset:
        out.append(("all", np.arange(data.n_train), np.arange(data.n_test)))
    if spec.by_class is not False:
        if data.labels_train is None:
            raise ValueError("slicing by class needs labels_train and labels_test")
        if spec.by_class is True:
            classes = np.unique(np.r_[data.labels_train, data.labels_test])
        elif isinstance(spec.by_class, int):
            classes = np.arange(spec.by_class)
        else:
            classes = np.asarray(list(spec.by_class), dtype=np.int64)
        for c in classes:
            out.append((f"class={int(c)}", np.nonzero(data.labels_train == c)[0], np.nonzero(data.labels_test == c)[0]))
    if spec.by_loss_percentile is not False:
        k = 10 if spec.by_loss_percentile is True else int(spec.by_loss_percentile)
        if k < 1:
            raise ValueError(f"by_loss_percentile must be True or a number of buckets >= 1, got {spec.by_loss_percentile}")
        lt, ls = data.get_loss("train"), data.get_loss("test")
        edges = np.quantile(np.r_[lt, ls], np.linspace(0, 1, k + 1))
        for i in range(k):
            lo, hi = edges[i], edges[i + 1]
            last = i == k - 1

            def inside(v):
                return (v >= lo) & ((v <= hi) if last else (v < hi))

            name = f"loss percentile {100 * i // k}-{100 * (i + 1) // k}"
            out.append((name, np.nonzero(inside(lt))[0], np.nonzero(inside(ls))[0]))
    return out


def _features(data: AttackInputData, side: str) -> np.ndarray:
    cols = [data.get_loss(side)[:, None]]
    logits = getattr(data, f"logits_{side}")
    if logits is not None:
        lp = log_softmax_np(logits)
        labels = getattr(data, f"labels_{side}")
        if labels is not None:
            cols.append(lp[np.arange(lp.shape[0]), labels][:, None])
        cols.append(-np.sort(-lp, axis=1)[:, : min(lp.shape[1], 10)])
    return np.concatenate(cols, axis=1)


def _need_logits(data: AttackInputData, attack: AttackType, labels: bool) -> None:
    if data.logits_train is None or (labels and data.labels_train is None):
        what = "logits and labels" if labels else "logits"
        raise ValueError(f"attack {attack.value} needs {what} (give logits_train/test{', labels_train/test' if labels else ''})")


def _attack_scores(data: AttackInputData, attack: AttackType, seed: int, fixed_variance: bool):
    """(member scores, non-member scores) of one attack on one slice."""
    if attack is AttackType.THRESHOLD_LOSS:
        return -data.get_loss("train"), -data.get_loss("test")
    if attack is AttackType.THRESHOLD_CONFIDENCE:
        _need_logits(data, attack, labels=False)
        return confidence_scores(data.logits_train), confidence_scores(data.logits_test)
    if attack is AttackType.THRESHOLD_TRUE_CLASS:
        _need_logits(data, attack, labels=True)
        return (true_class_probabilities(data.logits_train, data.labels_train),
                true_class_probabilities(data.logits_test, data.labels_test))
    if attack.is_trained:
        rng = np.random.default_rng(seed)
        pm, pn = rng.permutation(data.n_train), rng.permutation(data.n_test)
        hm, hn = data.n_train // 2, data.n_test // 2
        fm, fn = _features(data, "train"), _features(data, "test")
        x_fit = np.concatenate([fm[pm[:hm]], fn[pn[:hn]]])
        y_fit = np.r_[np.ones(hm), np.zeros(hn)]
        x_eval = np.concatenate([fm[pm[hm:]], fn[pn[hn:]]])
        kind = "logistic" if attack is AttackType.LOGISTIC_REGRESSION else "mlp"
        s = train_attacker(x_fit, y_fit, x_eval, kind=kind, seed=seed)
        return s[: data.n_train - hm], s[data.n_train - hm :]
    _need_logits(data, attack, labels=True)
    if data.shadow is None:
        raise ValueError(f"attack {attack.value} needs shadow models: AttackInputData(..., shadow=train_shadow_models(...))")
    target = np.r_[lira_statistic(data.logits_train, data.labels_train), lira_statistic(data.logits_test, data.labels_test)]
    s = lira_scores(target, data.shadow.stats, data.shadow.in_mask, online=attack is AttackType.LIRA_ONLINE,
                    fixed_variance=fixed_variance)
    return s[: data.n_train], s[data.n_train :]


def run_attacks(
    data: AttackInputData,
    attack_types: Iterable[AttackType | str] = (AttackType.THRESHOLD_LOSS,),
    slicing_spec: SlicingSpec | None = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    fprs: Sequence[float] = DEFAULT_FPRS,
    seed: int = 0,
    lira_fixed_variance: bool = False,
) -> AttackResults:
    """Run ``attack_types`` on every slice of ``slicing_spec`` (default: the whole data).

    Each result carries AUC, advantage, TPR at ``fprs`` and the epsilon lower bound at ``delta``
    with ``confidence`` (threshold chosen on a random half, bound on the other; see
    :class:`~.mia_results.AttackResult`).  Trained attackers are scored on the half of the slice
    they did not train on.  Everything random (splits, attacker weights) derives from ``seed``.
    """
    if not isinstance(data, AttackInputData):
        raise TypeError(f"data must be an AttackInputData, got {type(data).__name__}")
    requested = list(attack_types)
    try:
        attacks = [AttackType(a) for a in requested]
    except ValueError:
        raise ValueError(f"unknown attack in {requested}; choose from {[a.value for a in AttackType]}") from None
    if not attacks:
        raise ValueError("attack_types is empty")
    spec = SlicingSpec() if slicing_spec is None else slicing_spec
    results, skipped = [], []
    for name, ti, si in _slices(data, spec):
        need = max(spec.min_examples, 4)
        if ti.size < need or si.size < need:
            skipped.append(f"{name} ({ti.size} members, {si.size} non-members; fewer than {need})")
            continue
        part = data if name == "all" else data.subset(ti, si)
        for attack in attacks:
            m, n = _attack_scores(part, attack, seed, lira_fixed_variance)
            results.append(evaluate_scores(m, n, attack.value, name, delta, confidence, fprs, seed))
    return AttackResults(tuple(results), tuple(skipped))


def _split_batch(batch) -> tuple[object, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError("each batch must be a pair (inputs, labels); wrap other loaders to yield pairs")


def _model_outputs(model: torch.nn.Module, loader, loss_fn, device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    losses, logits, labels = [], [], []
    for batch in loader:
        x, y = _split_batch(batch)
        x = tuple(t.to(device) for t in x) if isinstance(x, (list, tuple)) else x.to(device)
        y = y.to(device)
        out = model(*x) if isinstance(x, tuple) else model(x)
        loss = loss_fn(out, y)
        if loss.ndim != 1 or loss.shape[0] != y.shape[0]:
            raise ValueError(f"loss_fn must return one loss per example (reduction='none'), got shape {tuple(loss.shape)}")
        losses.append(loss.double().cpu())
        logits.append(out.double().cpu())
        labels.append(y.cpu())
    if not losses:
        raise ValueError("a loader yielded no batches")
    return torch.cat(losses).numpy(), torch.cat(logits).numpy(), torch.cat(labels).numpy()


def compute_attack_inputs(
    model: torch.nn.Module,
    train_loader,
    test_loader,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    shadow: ShadowModels | None = None,
) -> AttackInputData:
    """Per-example losses, logits and labels of ``model`` on the members (``train_loader``) and
    non-members (``test_loader``), in eval mode without gradients; the model's mode is restored.

    ``loss_fn(logits, labels)`` must return one loss per example (default: cross-entropy with
    ``reduction="none"``).  Loaders yield ``(inputs, labels)`` pairs, in a fixed order when
    ``shadow`` is given (its columns follow the members then the non-members).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is None:
        def loss_fn(out, y):
            return torch.nn.functional.cross_entropy(out, y, reduction="none")
    with evaluating(model) as device:
        lt, zt, yt = _model_outputs(model, train_loader, loss_fn, device)
        ls, zs, ys = _model_outputs(model, test_loader, loss_fn, device)
    labels_ok = yt.ndim == 1 and yt.dtype.kind in "iu" and zt.ndim == 2
    return AttackInputData(
        loss_train=lt, loss_test=ls,
        logits_train=zt if zt.ndim == 2 else None, logits_test=zs if zs.ndim == 2 else None,
        labels_train=yt if labels_ok else None, labels_test=ys if labels_ok else None, shadow=shadow,
    )
