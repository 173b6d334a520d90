"""Secret sharer: how much a sequence model has memorised secrets inserted in its training data
(Carlini, Liu, Erlingsson, Kos, Song 2019, "The Secret Sharer").

A *format* is a token template with random slots ("my PIN is _ _ _ _"); a *secret* fills the
slots at random.  Secrets are inserted ``r`` times into the training sequences; after training,
each secret's log-perplexity ``-log2 Pr(secret)`` under the model is ranked among candidates that
fill the same format.  With ``R`` the set of all candidates::

    exposure(s) = log2 |R| - log2 rank(s)

which is ``log2 |R|`` for a secret ranked first (fully memorised) and about ``1/ln 2 = 1.44`` bits
on average for a secret the model has not seen.  When ``R`` is too large to enumerate the rank is
estimated from a random sample of references, or the exposure is *extrapolated* from a
distribution (skew-normal, as in the paper, or normal) fitted to the references'
log-perplexities: ``exposure ~ -log2 F(perplexity(s))``.

Works with any model mapping token ids ``(B, T)`` to next-token logits ``(B, T, V)`` (position
``t`` predicts token ``t + 1``), or returning an object with such a ``.logits``.
"""

from __future__ import annotations

import math
from typing import Sequence

import attrs
import numpy as np
import torch
from scipy import stats

from ._model import evaluating

__all__ = [
    "SecretFormat",
    "generate_secrets",
    "insert_secrets",
    "log_perplexity",
    "exposure_from_ranks",
    "extrapolated_exposure",
    "ExposureResult",
    "measure_exposure",
]


def _token_tuple(name: str, value, allow_none: bool) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of token ids")
    out = []
    for v in value:
        if v is None and allow_none:
            out.append(None)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0:
            out.append(int(v))
        else:
            raise TypeError(f"{name} must hold non-negative int token ids{' or None for a slot' if allow_none else ''}, got {v!r}")
    return tuple(out)


@attrs.frozen
class SecretFormat:
    """A template of token ids with ``None`` at each random slot, and the tokens a slot may take.

    ``SecretFormat([7, 8, None, None, None, None], vocab=range(10))`` is "7 8" followed by four
    random digits: ``space_size = 10**4`` candidates.
    """

    template: tuple = attrs.field(converter=lambda v: _token_tuple("template", list(v), True))
    vocab: tuple = attrs.field(converter=lambda v: _token_tuple("vocab", list(v), False))

    def __attrs_post_init__(self) -> None:
        if self.n_slots == 0:
            raise ValueError("template has no random slot (None): there is no secret to choose")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocab must not repeat a token")

    @property
    def n_slots(self) -> int:
        return sum(t is None for t in self.template)

    @property
    def space_size(self) -> int:
        """``|R| = len(vocab) ** n_slots``, the number of distinct candidates."""
        return len(self.vocab) ** self.n_slots

    @property
    def log2_space_size(self) -> float:
        return self.n_slots * math.log2(len(self.vocab))

    def _fill(self, codes: np.ndarray) -> np.ndarray:
        """Sequences for candidate numbers ``codes`` (base-``len(vocab)`` digits, first slot most significant)."""
        vocab = np.asarray(self.vocab, dtype=np.int64)
        out = np.empty((codes.size, len(self.template)), dtype=np.int64)
        slots = [i for i, t in enumerate(self.template) if t is None]
        rest = codes.astype(np.int64)
        for pos in reversed(slots):
            out[:, pos] = vocab[np.asarray(rest % len(vocab), dtype=np.int64)]
            rest = rest // len(vocab)
        for i, t in enumerate(self.template):
            if t is not None:
                out[:, i] = t
        return out

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` random candidates (rows of token ids), drawn uniformly with replacement."""
        picks = rng.integers(0, len(self.vocab), size=(n, self.n_slots))
        out = np.tile(np.asarray([0 if t is None else t for t in self.template], dtype=np.int64), (n, 1))
        slots = [i for i, t in enumerate(self.template) if t is None]
        out[:, slots] = np.asarray(self.vocab, dtype=np.int64)[picks]
        return out

    def all_candidates(self, limit: int = 1_000_000) -> np.ndarray:
        """Every candidate, ``(space_size, len(template))``; refused above ``limit`` rows."""
        if self.space_size > limit:
            raise ValueError(f"{self.space_size} candidates is more than limit={limit}: sample references instead")
        return self._fill(np.arange(self.space_size))


def _check_n(name: str, n, low: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < low:
        raise ValueError(f"{name} must be an int >= {low}, got {n!r}")
    return int(n)


def generate_secrets(fmt: SecretFormat, n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct random secrets of ``fmt`` (rows of token ids), from a generator seeded with ``seed``."""
    n = _check_n("n", n)
    if n > fmt.space_size:
        raise ValueError(f"cannot draw {n} distinct secrets from {fmt.space_size} candidates")
    rng = np.random.default_rng(seed)
    seen: dict[tuple, None] = {}
    while len(seen) < n:
        for row in fmt.sample(2 * (n - len(seen)), rng):
            seen.setdefault(tuple(row.tolist()), None)
            if len(seen) == n:
                break
    return np.asarray(list(seen), dtype=np.int64)


def insert_secrets(
    sequences: Sequence[Sequence[int]], secrets: np.ndarray, repetitions: int | Sequence[int], seed: int = 0
) -> list[np.ndarray]:
    """The training sequences with secret ``i`` added ``repetitions[i]`` times (an int: the same for
    all), as whole sequences at random positions.  ``sequences`` is not modified."""
    secrets = np.asarray(secrets)
    if secrets.ndim != 2:
        raise ValueError(f"secrets must be a 2-D array (n_secrets, length), got shape {secrets.shape}")
    reps = [repetitions] * len(secrets) if isinstance(repetitions, (int, np.integer)) else list(repetitions)
    if len(reps) != len(secrets):
        raise ValueError(f"{len(reps)} repetition counts for {len(secrets)} secrets")
    for r in reps:
        _check_n("repetitions", r, low=0)
    out = [np.asarray(s, dtype=np.int64) for s in sequences]
    extra = [secrets[i].astype(np.int64) for i, r in enumerate(reps) for _ in range(int(r))]
    rng = np.random.default_rng(seed)
    for s in extra:
        out.insert(int(rng.integers(0, len(out) + 1)), s.copy())
    return out


def log_perplexity(model: torch.nn.Module, sequences, batch_size: int = 256, start: int = 1) -> np.ndarray:
    """``-sum_{t >= start} log2 Pr(x_t | x_<t)`` for each sequence (rows of equal length), in bits.

    The model runs in eval mode without gradients (its mode is restored).  Tokens before
    ``start`` are context only (``start=1``: the whole sequence after its first token).  The
    template's fixed tokens add the same conditional terms to every candidate only when they
    precede all slots; ranks compare candidates, so any ``start`` up to the first slot works.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = torch.as_tensor(np.asarray(sequences), dtype=torch.long)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"sequences must be (n, length >= 2) token ids, got shape {tuple(x.shape)}")
    if not 1 <= start < x.shape[1]:
        raise ValueError(f"start must be in [1, {x.shape[1] - 1}], got {start}")
    batch_size = _check_n("batch_size", batch_size)
    out = []
    with evaluating(model) as device:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device)
            logits = model(xb)
            logits = getattr(logits, "logits", logits)
            if logits.ndim != 3 or logits.shape[:2] != xb.shape:
                raise ValueError(f"model must return next-token logits (B, T, V); got shape {tuple(logits.shape)}")
            lp = torch.log_softmax(logits[:, start - 1 : -1].double(), dim=-1)
            tok = lp.gather(-1, xb[:, start:].unsqueeze(-1)).squeeze(-1)
            out.append((-tok.sum(dim=1) / math.log(2)).cpu())
    return torch.cat(out).numpy()


def exposure_from_ranks(secret_perplexities, reference_perplexities) -> np.ndarray:
    """Exposure of each secret from its rank among references (lower perplexity ranks first).

    With ``count`` the number of references whose perplexity is ``<=`` the secret's (ties count
    against the secret) and ``n_ref`` references::

        exposure = log2(n_ref + 1) - log2(1 + count)

    Exact (``log2 |R| - log2 rank``) when the references are all the other candidates
    (``n_ref + 1 = |R|``); with a uniform sample of them it estimates it by
    ``rank ~ (1 + count) |R| / (n_ref + 1)`` and cannot exceed ``log2(n_ref + 1)`` (TF Privacy's
    interpolation uses ``log2 n_ref`` in place of ``log2(n_ref + 1)``).  Use
    :func:`extrapolated_exposure` to look beyond that.
    """
    s = np.asarray(secret_perplexities, dtype=np.float64).ravel()
    ref = np.sort(np.asarray(reference_perplexities, dtype=np.float64).ravel())
    if ref.size == 0:
        raise ValueError("need at least one reference perplexity")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(ref))):
        raise ValueError("perplexities must be finite")
    count = np.searchsorted(ref, s, side="right")
    return math.log2(ref.size + 1) - np.log2(1 + count)


def extrapolated_exposure(secret_perplexities, reference_perplexities, distribution: str = "skewnorm") -> np.ndarray:
    """``-log2 F(perplexity)`` with ``F`` the CDF of a ``"skewnorm"`` (Carlini et al. 2019) or
    ``"normal"`` distribution fitted (maximum likelihood) to the reference log-perplexities.

    Measures exposures beyond ``log2 n_ref`` when the candidate space is too large to enumerate,
    as far as the fitted tail is right.  ``inf`` when the fitted CDF underflows (the secret lies
    so far below the references that float64 cannot express the tail).
    """
    s = np.asarray(secret_perplexities, dtype=np.float64).ravel()
    ref = np.asarray(reference_perplexities, dtype=np.float64).ravel()
    if ref.size < 3:
        raise ValueError(f"need at least 3 reference perplexities to fit a distribution, got {ref.size}")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(ref))):
        raise ValueError("perplexities must be finite")
    if distribution == "normal":
        loc, scale = ref.mean(), max(ref.std(ddof=1), 1e-12)
        logcdf = stats.norm.logcdf(s, loc, scale)
    elif distribution == "skewnorm":
        a, loc, scale = stats.skewnorm.fit(ref)
        with np.errstate(divide="ignore"):
            logcdf = np.log(stats.skewnorm.cdf(s, a, loc, scale))
    else:
        raise ValueError(f"distribution must be 'skewnorm' or 'normal', got {distribution!r}")
    return np.maximum(-logcdf / math.log(2), 0.0)


@attrs.frozen(eq=False)
class ExposureResult:
    """Per-secret measurements (aligned with the secrets given).

    Attributes:
        perplexities: the secrets' log-perplexities (bits).
        reference_perplexities: the references' log-perplexities.
        exposure: :func:`exposure_from_ranks` (exact when the candidates were enumerated).
        extrapolated: :func:`extrapolated_exposure`.
        space_size: ``|R|``; ``enumerated``: whether the references were all other candidates.
    """

    perplexities: np.ndarray
    reference_perplexities: np.ndarray
    exposure: np.ndarray
    extrapolated: np.ndarray
    space_size: int
    enumerated: bool

    @property
    def max_exposure(self) -> float:
        """``log2 |R|``: the exposure of a secret ranked first."""
        return math.log2(self.space_size)

    def to_dict(self) -> dict:
        """Plain-Python view (JSON-serialisable; an infinite extrapolation is the string ``"inf"``)."""
        return {
            "perplexities": self.perplexities.tolist(),
            "exposure": self.exposure.tolist(),
            "extrapolated": [float(v) if math.isfinite(v) else "inf" for v in self.extrapolated],
            "n_references": int(self.reference_perplexities.size),
            "space_size": self.space_size,
            "enumerated": self.enumerated,
        }

    def __str__(self) -> str:
        rows = [f"secret {i}: log-perplexity {p:.2f} bits, exposure {e:.2f}, extrapolated {x:.2f}"
                for i, (p, e, x) in enumerate(zip(self.perplexities, self.exposure, self.extrapolated))]
        how = "all candidates" if self.enumerated else f"{self.reference_perplexities.size} sampled references"
        return f"exposure (max log2|R| = {self.max_exposure:.2f}; ranks among {how})\n" + "\n".join(rows)


def measure_exposure(
    model: torch.nn.Module,
    secrets: np.ndarray,
    fmt: SecretFormat,
    n_references: int = 10_000,
    seed: int = 0,
    batch_size: int = 256,
    distribution: str = "skewnorm",
    enumerate_limit: int = 100_000,
) -> ExposureResult:
    """Exposure of ``secrets`` (rows of ``fmt``) under ``model``.

    When ``fmt.space_size <= enumerate_limit`` every candidate is scored and each secret is ranked
    among all the others (exact ranks); otherwise ``n_references`` random candidates are drawn
    (seeded) and those equal to a secret dropped.  The extrapolated exposure is fitted to the
    references' log-perplexities (the secrets left out).
    """
    if not isinstance(fmt, SecretFormat):
        raise TypeError("fmt must be a SecretFormat")
    sec = np.asarray(secrets, dtype=np.int64)
    if sec.ndim != 2 or sec.shape[1] != len(fmt.template):
        raise ValueError(f"secrets must be (n, {len(fmt.template)}) rows of the format, got shape {sec.shape}")
    fixed = [i for i, t in enumerate(fmt.template) if t is not None]
    if not np.all(sec[:, fixed] == np.asarray([fmt.template[i] for i in fixed])):
        raise ValueError("secrets do not match the format's fixed tokens")
    rows = sec.tolist()
    first_slot = min(i for i, t in enumerate(fmt.template) if t is None)
    start = max(first_slot, 1)
    sec_ppl = log_perplexity(model, sec, batch_size, start)
    enumerated = fmt.space_size <= enumerate_limit
    if enumerated:
        cands = fmt.all_candidates(enumerate_limit)
    else:
        cands = fmt.sample(_check_n("n_references", n_references, low=3), np.random.default_rng(seed))
    cand_rows = {tuple(r): i for i, r in enumerate(cands.tolist())}
    is_secret = np.zeros(len(cands), dtype=bool)
    is_secret[[cand_rows[tuple(r)] for r in rows if tuple(r) in cand_rows]] = True
    if (~is_secret).sum() < 3:
        raise ValueError("fewer than 3 references remain: use a larger format")
    cand_ppl = log_perplexity(model, cands, batch_size, start)
    ref_ppl = cand_ppl[~is_secret]
    if enumerated:  # each secret against every other candidate (the other secrets included): exact ranks
        exposure = np.array([
            exposure_from_ranks(p, np.delete(cand_ppl, cand_rows[tuple(r)])) for p, r in zip(sec_ppl, rows)
        ]).ravel()
    else:
        exposure = exposure_from_ranks(sec_ppl, ref_ppl)
    return ExposureResult(
        perplexities=sec_ppl,
        reference_perplexities=ref_ppl,
        exposure=exposure,
        extrapolated=extrapolated_exposure(sec_ppl, ref_ppl, distribution),
        space_size=fmt.space_size,
        enumerated=enumerated,
    )
