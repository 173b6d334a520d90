"""Owned randomness for queries and samplers: OS-seeded generators, checkpointable state, and a
cryptographically secure mode.

Every object that draws private noise or private samples (a Gaussian query, a quantile query, a
Poisson sampler) holds one :class:`RandomSource`.  It never touches torch's global RNG, so
``torch.manual_seed`` in a training script can neither make two runs share noise nor make a resumed
run repeat the noise of its first steps.

Three kinds of source:

* **owned** (the default, ``generator=None``): one ``torch.Generator`` per device, created on first
  use and seeded with 63 bits from the OS (:func:`secrets.randbits`).  Fast (torch's Philox on CUDA,
  Mersenne Twister on CPU), saved by :meth:`RandomSource.state_dict` and restored exactly, so a
  resumed run continues the stream instead of restarting it.  Not cryptographically secure: an
  adversary who sees enough raw draws could in principle recover the generator state.
* **user** (``generator=torch.Generator(...).manual_seed(s)``): draws from the given generator, on
  its device (reproducible runs, tests).  Saved and restored the same way.
* **secure** (``secure_mode=True``): every draw reads fresh bytes from the OS CSPRNG
  (:func:`os.urandom`); there is no state to save and nothing is ever repeated.  Gaussian noise is
  built in float64 by the Box-Muller transform from 53-bit uniforms, and, as the mitigation of the
  floating-point attacks on Gaussian samplers (Mironov 2012, "On significance of the least
  significant bits for differential privacy"; Holohan and Braghin 2021, "Secure random sampling in
  differential privacy"), each coordinate is the sum of :data:`SECURE_NOISE_TERMS` independent
  normals of variance ``1/SECURE_NOISE_TERMS``, which smooths the gaps and the non-uniform spacing
  of a single floating-point sample (the approach Opacus takes in its secure mode).  The cost is
  ``SECURE_NOISE_TERMS`` times the uniform bits plus a CPU transform (see docs/deployment.md for
  measured figures); noise for GPU tensors is drawn on the CPU and copied.  Bernoulli masks for
  Poisson sampling compare 64 secure bits with ``floor(q * 2**64)``, exact to ``2**-64``.
  Since ``U1 >= 2**-53``, one Box-Muller normal never exceeds ``sqrt(2 * 53 ln 2) = 8.57`` in
  magnitude (the normal mass beyond is ~1e-17), so each summed coordinate is bounded by
  ``8.57 * sqrt(SECURE_NOISE_TERMS)``: a truncation whose effect on the guarantee is of that order.

Noise is always drawn in float32 or wider (float64 for float64 tensors, float64 in secure mode),
never in the precision of float16/bfloat16 parameters: an fp16 draw takes only ~22 thousand
distinct values per million draws (bf16: ~3.5 thousand), a discretisation the Gaussian
mechanism's analysis does not cover.  :func:`noise_dtype` is the rule.
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Any

import numpy as np
import torch

__all__ = [
    "RandomSource",
    "as_random_source",
    "noise_dtype",
    "os_seed",
    "secure_standard_normal",
    "secure_bernoulli",
    "SECURE_NOISE_TERMS",
]

#: Independent normals summed (each of variance ``1/k``) per coordinate in secure mode.
SECURE_NOISE_TERMS = 4

_CHUNK = 1 << 20  # secure draws are made in chunks of this many values (bounded memory)


def os_seed() -> int:
    """63 bits of OS entropy, a seed for a fresh ``torch.Generator`` (never torch's global RNG)."""
    return secrets.randbits(63)


def noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype noise for a tensor of ``dtype`` is drawn and added in: float64 for float64,
    float32 for everything else (float16, bfloat16, float32 and non-floating)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _device_key(device: torch.device | str) -> str:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


def _secure_uniform_open(n: int) -> np.ndarray:
    """``n`` float64 uniforms on (0, 1], each ``(k + 1) * 2**-53`` for 53 secure random bits ``k``."""
    k = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (k.astype(np.float64) + 1.0) * 2.0**-53


def secure_standard_normal(n: int, terms: int = SECURE_NOISE_TERMS) -> np.ndarray:
    """``n`` standard normals (float64) from the OS CSPRNG.

    Each value is ``sum_{j<terms} Z_j / sqrt(terms)`` with independent ``Z_j`` drawn by the
    Box-Muller transform ``sqrt(-2 ln U1) * (cos, sin)(2 pi U2)`` of secure 53-bit uniforms.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
        raise ValueError(f"terms must be a positive integer, got {terms!r}")
    out = np.zeros(n, dtype=np.float64)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        half = (m + 1) // 2
        acc = np.zeros(m, dtype=np.float64)
        for _ in range(terms):
            r = np.sqrt(-2.0 * np.log(_secure_uniform_open(half)))
            theta = (2.0 * math.pi) * _secure_uniform_open(half)
            acc += np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:m]
        out[start : start + m] = acc / math.sqrt(terms)
    return out


def secure_bernoulli(n: int, p: float) -> torch.Tensor:
    """A bool tensor of ``n`` independent Bernoulli(``p``) from the OS CSPRNG: 64 random bits
    ``u`` per entry, ``True`` iff ``u < floor(p * 2**64)`` (so ``P = p`` to within ``2**-64``)."""
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    if p >= 1:
        return torch.ones(n, dtype=torch.bool)
    threshold = np.uint64(int(p * 2.0**64))
    out = np.empty(n, dtype=bool)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        out[start : start + m] = np.frombuffer(os.urandom(8 * m), dtype=np.uint64) < threshold
    return torch.from_numpy(out)


class RandomSource:
    """The randomness one query or sampler owns (see the module docstring).

    Args:
        generator: a ``torch.Generator`` to draw from (reproducible runs), or ``None`` for
            owned generators seeded from OS entropy, one per device, created on first use.
        secure_mode: draw everything from the OS CSPRNG instead (no ``generator`` allowed).

    :meth:`state_dict` / :meth:`load_state_dict` save and restore the generator states exactly
    (a secure source has none).
    """

    def __init__(self, generator: torch.Generator | None = None, *, secure_mode: bool = False):
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool, got {type(secure_mode).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if secure_mode and generator is not None:
            raise ValueError(
                "secure_mode=True draws from the OS CSPRNG; a torch.Generator is not cryptographically "
                "secure and cannot be used with it. Drop generator=..., or set secure_mode=False"
            )
        self._user = generator
        self._secure = secure_mode
        self._owned: dict[str, torch.Generator] = {}
        #: a held prefetch (:meth:`prefetch_normal`): ``(key, normals, generator, state before,
        #: state after)``, or ``None``
        self._prefetched: tuple | None = None

    # -- properties ----------------------------------------------------------------------
    @property
    def secure_mode(self) -> bool:
        """Whether draws come from the OS CSPRNG."""
        return self._secure

    @property
    def kind(self) -> str:
        """``"secure"``, ``"user"`` (a given generator) or ``"owned"`` (OS-seeded)."""
        return "secure" if self._secure else ("user" if self._user is not None else "owned")

    @property
    def generator(self) -> torch.Generator | None:
        """The user's generator, or ``None``."""
        return self._user

    def torch_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The ``torch.Generator`` draws for ``device`` use (the user's on its own device)."""
        self._settle()
        if self._secure:
            raise ValueError("a secure_mode source has no torch.Generator; it draws from os.urandom")
        return self._generator_for(device)

    def _generator_for(self, device: torch.device | str) -> torch.Generator:
        """The user's generator, or the owned one for ``device`` (created, OS-seeded, if missing)."""
        if self._user is not None:
            return self._user
        key = _device_key(device)
        g = self._owned.get(key)
        if g is None:
            g = torch.Generator(device=key)
            g.manual_seed(os_seed())
            self._owned[key] = g
        return g

    def stream_state(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Where the next draw for ``device`` starts: the state of the generator it uses, before
        a held prefetch (whose values are that draw's); ``None`` for a secure source (every draw is
        fresh OS entropy).  Two sources with equal stream states draw equal values, which is what
        the distributed steps check across ranks.  Draws nothing and keeps a held prefetch; an
        owned source gets its (OS-seeded) generator for ``device`` now if it had none."""
        if self._secure:
            return None
        g = self._generator_for(device)
        if self._prefetched is not None and self._prefetched[2] is g and self._untouched():
            return self._prefetched[3]
        return g.get_state()

    # -- draws ---------------------------------------------------------------------------
    def normal(self, shape, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normals of ``shape`` on ``device``, drawn in ``noise_dtype(dtype)`` (float64
        in secure mode) and returned in that dtype (float32 or wider)."""
        wide = noise_dtype(dtype)
        shape = tuple(shape)
        if self._prefetched is not None:
            z = self._take((shape, _device_key(device), wide))
            if z is not None:
                return z
        if self._secure:
            n = math.prod(shape)
            z = torch.from_numpy(secure_standard_normal(n)).reshape(shape)
            return z.to(device=device, dtype=wide)
        g = self.torch_generator(device)
        z = torch.randn(shape, generator=g, device=g.device, dtype=wide)
        return z if z.device == torch.device(device) else z.to(device)

    # -- prefetching (draws made early, e.g. while a collective is in flight) --------------
    def prefetch_normal(self, shape, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        """Draw now the standard normals that the next :meth:`normal` of this shape, device and
        dtype will return.  Invisible in the stream: they are the values that call would draw,
        :meth:`state_dict` describes the position before them, and any other draw (or a
        ``load_state_dict``) first rewinds the generator to that position, as if they had never
        been drawn.  If something else drew from the generator meanwhile (a user's generator
        shared with other code), they are discarded instead: never returned twice, never
        rewound over someone else's draws."""
        self._settle()
        shape = tuple(shape)
        key = (shape, _device_key(device), noise_dtype(dtype))
        g = None if self._secure else self.torch_generator(device)
        before = None if g is None else g.get_state()
        z = self.normal(shape, device=device, dtype=dtype)
        self._prefetched = (key, z, g, before, None if g is None else g.get_state())

    def _untouched(self) -> bool:
        """Whether the held prefetch's generator is where the prefetch left it."""
        _, _, g, _, after = self._prefetched  # type: ignore[misc]
        return g is None or torch.equal(g.get_state(), after)

    def _take(self, key: tuple | None) -> torch.Tensor | None:
        """The held prefetch if ``key`` matches it (and its generator is untouched); else drop it,
        rewinding its generator when untouched.  ``None`` when nothing was taken."""
        pkey, z, g, before, _ = self._prefetched  # type: ignore[misc]
        untouched = self._untouched()
        self._prefetched = None
        if untouched and pkey == key:
            return z
        if untouched and g is not None:
            g.set_state(before)
        return None

    def _settle(self) -> None:
        """Before any other draw: give back a held prefetch (see :meth:`prefetch_normal`)."""
        if self._prefetched is not None:
            self._take(None)

    def bernoulli_mask(self, n: int, p: float) -> torch.Tensor:
        """A CPU bool tensor of ``n`` independent Bernoulli(``p``) draws."""
        self._settle()
        if self._secure:
            return secure_bernoulli(n, p)
        g = self.torch_generator("cpu")
        if g.device.type != "cpu":
            return (torch.rand(n, generator=g, device=g.device) < p).cpu()
        return torch.rand(n, generator=g) < p

    # -- state ---------------------------------------------------------------------------
    def _generators(self) -> dict[str, torch.Generator]:
        if self._secure:
            return {}
        if self._user is not None:
            return {_device_key(self._user.device): self._user}
        return dict(self._owned)

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": ..., "states": {device: generator state}}`` (plain tensors; safe for
        ``torch.load(weights_only=True)``)."""
        gens = self._generators()
        states = {k: g.get_state() for k, g in gens.items()}
        if self._prefetched is not None and self._prefetched[2] is not None and self._untouched():
            g, before = self._prefetched[2], self._prefetched[3]  # the position before the prefetch
            states.update({k: before.clone() for k, s in gens.items() if s is g})
        return {"kind": self.kind, "states": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore generator states saved by :meth:`state_dict` (of any kind of source).

        A secure source ignores saved states (it never needs them).  An owned source recreates
        the generator of each saved device; a device that is not available here keeps a fresh
        OS-seeded generator (the stream never repeats; it just is not the saved one).
        """
        if not isinstance(state, dict) or not isinstance(state.get("states"), dict):
            raise ValueError("not a RandomSource state dict (expected {'kind': ..., 'states': {device: tensor}})")
        self._prefetched = None  # drawn from a position this restore replaces
        if self._secure:
            return
        for key, st in state["states"].items():
            if not isinstance(st, torch.Tensor) or st.dtype != torch.uint8:
                raise ValueError(f"corrupt generator state for device {key!r}: expected a uint8 tensor")
            if self._user is not None:
                if key == _device_key(self._user.device) or len(state["states"]) == 1:
                    self._user.set_state(st)
                continue
            dev = torch.device(key)
            if dev.type == "cuda" and not torch.cuda.is_available():
                continue
            self.torch_generator(dev).set_state(st)

    def reseed(self) -> None:
        """Reseed the owned generators from OS entropy (a user's generator is left alone: its
        seeding is the user's choice).  Use it to branch several runs from one checkpoint: an
        exact restore would give every branch the same noise."""
        self._prefetched = None
        for g in self._owned.values():
            g.manual_seed(os_seed())

    def set_legacy_state(self, st: torch.Tensor) -> None:
        """Restore a bare generator state from an old checkpoint (one ``torch.Generator`` per
        query); it applies to the user's generator or the CPU generator."""
        if self._secure:
            return
        self._prefetched = None
        g = self._user if self._user is not None else self.torch_generator("cpu")
        g.set_state(st)

    def __repr__(self) -> str:
        return f"RandomSource(kind={self.kind!r})"


def as_random_source(generator: Any = None, *, secure_mode: bool = False) -> RandomSource:
    """The :class:`RandomSource` for a query's or sampler's ``generator`` argument: a
    ``RandomSource`` is shared as is, a ``torch.Generator`` is wrapped, ``None`` gives a fresh
    OS-seeded (or, with ``secure_mode``, secure) source."""
    if isinstance(generator, RandomSource):
        if secure_mode and not generator.secure_mode:
            raise ValueError("secure_mode=True needs a secure RandomSource; this one is " + generator.kind)
        return generator
    if generator is None or isinstance(generator, torch.Generator):
        return RandomSource(generator, secure_mode=secure_mode)
    raise TypeError(f"generator must be a torch.Generator, a RandomSource or None, got {type(generator).__name__}")
