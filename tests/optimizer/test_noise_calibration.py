"""The optimizer's noise, measured per parameter tensor, equals what the ledger says it is.

An empty Poisson batch contributes nothing, so the released update of an empty-batch step is
pure noise: with plain SGD at ``lr=1`` the parameter change is ``-N(0, (k sigma C / D)^2 I)``,
where ``C`` is the clip, ``D`` the public denominator and ``k`` the number of sensitive passes
clipped separately (``pass_clipping="per_pass"``, else 1).  For every optimizer path this file
measures, for every parameter tensor separately (weights and biases apart):

* the standard deviation against ``k C / D`` times the noise multiplier *read from the ledger*
  (and that multiplier against the one configured), within 1%;
* the mean against 0;
* the correlation with every other tensor of the same step, with the same tensor at the next
  step, and between neighbouring coordinates, against 0.

Sizes: every tensor has >= 131072 coordinates per step (about 0.92M per step, 1.8M per run), so
the relative standard error of a sample std is ``1/sqrt(2n) <= 0.2%``: a 1% tolerance is more than
five standard errors, and a noise 5% too low (or missing on one tensor) fails by 25 or more.  All
draws come from seeded ``torch.Generator`` s, so the test is deterministic.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch import nn

from pytorch_privacy.dp_query import ComposedEvent, GaussianEvent, PrivacyLedger
from pytorch_privacy.dp_query.normalized_query import GaussianAverageQuery, NormalizedQuery
from pytorch_privacy.dp_query.quantile_adaptive_clip_sum_query import QuantileAdaptiveClipSumQuery
from pytorch_privacy.optimizer import DPGaussianOptimizer, DPOptimizer

# population and sampling rate of the ledger: expected batch q*N = 2, so empty batches are
# common (P = 0.995^400 = 0.13) and a run of them is plausible under the ledger's sampling
N, Q = 400, 0.005
EXPECTED_BATCH = 2.0  # q*N, written out independently of the code under test
SIGMA = 1.3
WIDTH = 1 << 17  # 131072: the smallest tensor's size
REL_TOL = 0.01  # 1% on every tensor's std
Z = 5.0  # bounds on means and correlations: Z standard errors
STEPS = 2

PATHS = ["gaussian_optimizer", "gaussian_average_query", "adaptive_clip", "per_pass", "microbatches"]
CLIPS = [0.1, 0.7, 10.0]


class Wide(nn.Module):
    """Four large tensors (two weights, two biases), each >= 131072 coordinates."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, WIDTH)  # weight 524288, bias 131072
        self.gate = nn.Linear(1, WIDTH)  # weight 131072, bias 131072

    def forward(self, x):
        h = self.fc(x) * torch.tanh(self.gate(x[:, :1]))
        return h.reshape(x.shape[0], 2, -1).mean(-1)


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Sized for one core; one intra-op thread also avoids thread-pool stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sum_noise_multiplier(event) -> float:
    """The noise multiplier of the gradient sum in a recorded step's event: the event itself
    for a Gaussian sum, the first component of adaptive clipping's (sum, count) pair."""
    if isinstance(event, GaussianEvent):
        return float(event.noise_multiplier)
    if isinstance(event, ComposedEvent) and isinstance(event.events[0], GaussianEvent):
        return float(event.events[0].noise_multiplier)
    raise AssertionError(f"unexpected event in the ledger: {event!r}")


def _build(path: str, clip: float, seed: int):
    """``(model, optimizer, ledger, denominator, passes)`` for one optimizer path."""
    torch.manual_seed(seed)
    model = Wide()
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    ledger = PrivacyLedger(N, Q)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{path}/{clip}/{seed}".encode()))  # own draws per run
    if path == "gaussian_optimizer":
        opt = DPGaussianOptimizer(sgd, model, ce, clip, SIGMA, ledger=ledger, generator=gen)
        return model, opt, ledger, EXPECTED_BATCH, 1
    if path == "gaussian_average_query":
        query = GaussianAverageQuery(clip, SIGMA * clip, EXPECTED_BATCH, generator=gen)
        return model, DPOptimizer(sgd, model, ce, query, ledger=ledger), ledger, EXPECTED_BATCH, 1
    if path == "adaptive_clip":
        inner = QuantileAdaptiveClipSumQuery(
            initial_l2_norm_clip=clip, noise_multiplier=SIGMA, target_unclipped_quantile=0.5,
            learning_rate=0.2, clipped_count_stddev=0.4, expected_num_records=EXPECTED_BATCH, generator=gen,
        )
        query = NormalizedQuery(inner, EXPECTED_BATCH)
        return model, DPOptimizer(sgd, model, ce, query, ledger=ledger), ledger, EXPECTED_BATCH, 1
    if path == "per_pass":
        opt = DPGaussianOptimizer(sgd, model, ce, clip, SIGMA, ledger=ledger, generator=gen, pass_clipping="per_pass")
        return model, opt, ledger, EXPECTED_BATCH, 2
    if path == "microbatches":
        opt = DPGaussianOptimizer(sgd, model, ce, clip, SIGMA, ledger=ledger, generator=gen, num_microbatches=4)
        return model, opt, ledger, 4.0, 1
    raise KeyError(path)


def _current_clip(path: str, opt, clip: float) -> float:
    """The clip used by the next step (adaptive clipping moves it after every step)."""
    if path != "adaptive_clip":
        return clip
    return float(opt.global_state.numerator_state.sum_state.l2_norm_clip)


def _empty_step(opt, passes: int) -> None:
    x, y = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    if passes == 1:
        opt.fit_batch(x, y)
        return
    opt.zero_grad()
    for _ in range(passes):
        opt.backward_pass(x, y)
    opt.step()


def _run(path: str, clip: float, seed: int = 0):
    """Take ``STEPS`` empty-batch steps; per step: the scale ``k C / D`` and ``{name: noise}``."""
    model, opt, ledger, denominator, passes = _build(path, clip, seed)
    steps = []
    for _ in range(STEPS):
        scale = passes * _current_clip(path, opt, clip) / denominator
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        _empty_step(opt, passes)
        # SGD at lr=1: p_new = p_old - released gradient, and the released gradient is noise
        noise = {n: (before[n] - p.detach().double()).flatten() for n, p in model.named_parameters()}
        steps.append((scale, noise))
    return steps, ledger


def _standardise(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean()) / z.std()


def _corr(u: torch.Tensor, v: torch.Tensor) -> float:
    """Correlation of two standardised samples over their common length ``m`` (standard
    error ``1/sqrt(m)`` for independent samples)."""
    m = min(u.numel(), v.numel())
    return float(torch.dot(u[:m], v[:m])) / m


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("path", PATHS)
def test_noise_per_tensor_equals_the_ledger(path, clip):
    steps, ledger = _run(path, clip)
    # the ledger counts every step, empty ones included, with the configured multiplier
    assert len(ledger) == STEPS, f"{path}: the ledger recorded {len(ledger)} of {STEPS} (empty) steps"
    sigmas = {_sum_noise_multiplier(r.event) for r in ledger.runs}
    assert len(sigmas) == 1, f"{path}: steps with different events {ledger.runs}"
    sigma_ledger = sigmas.pop()
    assert sigma_ledger == pytest.approx(SIGMA, rel=1e-12), f"{path}: ledger sigma {sigma_ledger} != {SIGMA}"

    names = list(steps[0][1])
    assert len(names) == 4
    std_noise = [{n: _standardise(z) for n, z in noise.items()} for _, noise in steps]
    for t, (scale, noise) in enumerate(steps):
        for name in names:
            z = noise[name]
            n = z.numel()
            assert n >= WIDTH
            std = float(z.std())
            ratio = std / scale  # the measured noise multiplier of this tensor
            assert abs(ratio / sigma_ledger - 1) < REL_TOL, (
                f"{path}, clip {clip}, step {t}, {name}: measured std/(kC/D) = {ratio:.5f}, "
                f"ledger sigma = {sigma_ledger}"
            )
            assert abs(float(z.mean())) < Z * std / math.sqrt(n), f"{path} {name}: mean {float(z.mean())}"
            u = std_noise[t][name]
            # neighbouring coordinates of one tensor are independent
            assert abs(_corr(u[:-1], u[1:])) < Z / math.sqrt(n - 1), f"{path} {name}: lag-1 correlation"
        # tensors are independent of each other within a step ...
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                r = _corr(std_noise[t][a], std_noise[t][b])
                m = min(noise[a].numel(), noise[b].numel())
                assert abs(r) < Z / math.sqrt(m), f"{path} step {t}: corr({a}, {b}) = {r:.4g}"
    # ... and of themselves at the next step
    for name in names:
        r = _corr(std_noise[0][name], std_noise[1][name])
        assert abs(r) < Z / math.sqrt(std_noise[0][name].numel()), f"{path}: {name} correlated across steps ({r:.4g})"


def test_noise_is_independent_across_optimizers_and_matches_in_float64():
    """Two optimizers with different generators draw independent noise; a float64 model gets
    float64 noise of the same scale (no precision loss in the measurement)."""
    n1 = _run("gaussian_optimizer", 0.7, seed=0)[0][0][1]
    n2 = _run("gaussian_optimizer", 0.7, seed=1)[0][0][1]
    for name in n1:
        assert abs(_corr(_standardise(n1[name]), _standardise(n2[name]))) < Z / math.sqrt(n1[name].numel())

    torch.manual_seed(0)
    model = Wide().double()
    ledger = PrivacyLedger(N, Q)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), model, ce, 0.7, SIGMA, ledger=ledger,
        generator=torch.Generator().manual_seed(7),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.fit_batch(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    for n, p in model.named_parameters():
        z = before[n] - p.detach()
        assert z.dtype == torch.float64
        assert abs(float(z.std()) / (0.7 / EXPECTED_BATCH) / _sum_noise_multiplier(ledger.last_run.event) - 1) < REL_TOL
