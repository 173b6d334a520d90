"""auditing.secret_sharer: formats and insertion, log-perplexity and exposure against hand
values (a context-free model with known probabilities), the fitted-tail extrapolation, and a tiny
causal MLP language model that memorises an inserted secret."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pytorch_privacy.auditing.secret_sharer import (
    SecretFormat,
    exposure_from_ranks,
    extrapolated_exposure,
    generate_secrets,
    insert_secrets,
    log_perplexity,
    measure_exposure,
)

FMT = SecretFormat([10, 11, None, None, None, None], vocab=range(10))  # "ab" + 4 digits


pytestmark = pytest.mark.usefixtures("one_thread")


def test_format_space_and_candidates():
    assert FMT.n_slots == 4 and FMT.space_size == 10_000
    assert FMT.log2_space_size == pytest.approx(math.log2(10_000))
    small = SecretFormat([None, 5, None], vocab=[1, 2, 3])
    c = small.all_candidates()
    assert c.shape == (9, 3) and len({tuple(r) for r in c.tolist()}) == 9
    assert (c[:, 1] == 5).all() and set(c[:, 0]) == {1, 2, 3} and set(c[:, 2]) == {1, 2, 3}
    s = FMT.sample(50, np.random.default_rng(0))
    assert (s[:, :2] == [10, 11]).all() and s[:, 2:].max() <= 9
    with pytest.raises(ValueError):
        FMT.all_candidates(limit=100)


def test_generate_secrets_distinct_and_seeded():
    a = generate_secrets(FMT, 20, seed=3)
    assert a.shape == (20, 6) and len({tuple(r) for r in a.tolist()}) == 20
    np.testing.assert_array_equal(a, generate_secrets(FMT, 20, seed=3))
    assert not np.array_equal(a, generate_secrets(FMT, 20, seed=4))
    tiny = SecretFormat([None], vocab=[0, 1])
    assert sorted(generate_secrets(tiny, 2).ravel().tolist()) == [0, 1]
    with pytest.raises(ValueError):
        generate_secrets(tiny, 3)


def test_insert_secrets_counts_and_leaves_input_alone():
    base = [np.array([1, 2, 3, 4, 5, 6]) for _ in range(30)]
    sec = generate_secrets(FMT, 3, seed=0)
    out = insert_secrets(base, sec, [5, 0, 2], seed=1)
    assert len(out) == 37 and len(base) == 30
    rows = [tuple(r.tolist()) for r in out]
    assert [rows.count(tuple(s.tolist())) for s in sec] == [5, 0, 2]
    assert len(insert_secrets(base, sec, 1)) == 33
    with pytest.raises(ValueError):
        insert_secrets(base, sec, [1, 2])
    with pytest.raises(ValueError):
        insert_secrets(base, sec, -1)


class Unigram(torch.nn.Module):
    """Next-token distribution independent of the context: Pr(token) = softmax(w)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.as_tensor(w, dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(x.shape[0], x.shape[1], -1)


def test_log_perplexity_and_exact_exposure_on_a_known_model():
    # digit d has weight -d: the most likely secret is "ab0000", ranks follow the digit sum.
    w = torch.cat([-torch.arange(10.0), torch.zeros(2)]).double()
    model = Unigram(w)
    logp = torch.log_softmax(w, 0).numpy() / math.log(2)
    seq = np.array([[10, 11, 0, 0, 0, 0], [10, 11, 9, 9, 9, 9], [10, 11, 1, 2, 3, 4]])
    ppl = log_perplexity(model, seq, start=2)
    np.testing.assert_allclose(ppl, [-logp[[0, 0, 0, 0]].sum(), -logp[[9] * 4].sum(), -logp[[1, 2, 3, 4]].sum()], rtol=1e-12)
    full = log_perplexity(model, seq)  # start=1 adds Pr(token 11) to every row
    np.testing.assert_allclose(full - ppl, -logp[11], rtol=1e-12)
    res = measure_exposure(model, seq, FMT)
    assert res.enumerated and res.reference_perplexities.size == 10_000 - 3
    # "0000" ranks first of 10^4: exposure log2(10^4); "9999" ranks last: exposure 0.
    assert res.exposure[0] == pytest.approx(math.log2(10_000), abs=1e-12)
    assert res.exposure[1] == pytest.approx(0.0, abs=1e-12)
    # "1234" (digit sum 10) is tied with the other strings of digit sum 10 up to float rounding
    # of the sums: its rank lies between 1 + #(sum <= 9) = 1 + C(13, 4) = 716 and #(sum <= 10) =
    # C(14, 4) - 4 = 997 (the 4 strings with a digit 10 do not exist).
    le9 = sum(1 for k in range(10_000) if sum(map(int, f"{k:04d}")) <= 9)
    le10 = sum(1 for k in range(10_000) if sum(map(int, f"{k:04d}")) <= 10)
    assert (le9, le10) == (math.comb(13, 4), math.comb(14, 4) - 4)
    top = math.log2(10_000)
    assert top - math.log2(le10) - 1e-9 <= res.exposure[2] <= top - math.log2(le9 + 1) + 1e-9
    json.dumps(res.to_dict())
    assert "exposure" in str(res) and res.max_exposure == pytest.approx(math.log2(10_000))


def test_exposure_from_ranks_hand_values():
    ref = [1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_allclose(exposure_from_ranks([0.5, 3, 10], ref), [3.0, 3 - 2, 0.0], atol=1e-15)
    with pytest.raises(ValueError):
        exposure_from_ranks([1.0], [])
    with pytest.raises(ValueError):
        exposure_from_ranks([float("nan")], ref)


def test_extrapolated_exposure_normal_and_skewnorm():
    np.testing.assert_allclose(
        extrapolated_exposure([0.0, -2.0], [-1.0, 0.0, 1.0], "normal"),  # mean 0, sd 1 (ddof 1)
        [1.0, -math.log2(stats.norm.cdf(-2.0))], rtol=1e-12,
    )
    # references from a skew-normal (a = 4); a secret at the true 1% quantile has exposure
    # log2(100) = 6.64.  4000 draws pin the fitted tail to within about 0.3 bits (seeded).
    ref = stats.skewnorm.rvs(4, loc=20, scale=3, size=4000, random_state=np.random.default_rng(0))
    q = stats.skewnorm.ppf(0.01, 4, loc=20, scale=3)
    assert extrapolated_exposure([q], ref)[0] == pytest.approx(math.log2(100), abs=0.5)
    assert extrapolated_exposure([-1e6], ref)[0] == math.inf  # far beyond the tail: documented inf
    assert extrapolated_exposure([1e6], ref)[0] == 0.0
    with pytest.raises(ValueError):
        extrapolated_exposure([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        extrapolated_exposure([1.0], [1.0, 2.0, 3.0], "gamma")


class TinyLM(torch.nn.Module):
    """A causal MLP language model: logits at position t from the embeddings of tokens
    t, t-1, t-2 (earlier positions padded with a learned start vector)."""

    def __init__(self, vocab: int, window: int = 3, dim: int = 8, hidden: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.window = window
        self.emb = torch.nn.Embedding(vocab + 1, dim)  # index `vocab` is the padding
        self.hidden = torch.nn.Linear(window * dim, hidden)
        self.out = torch.nn.Linear(hidden, vocab)
        self.pad = vocab
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        padded = torch.nn.functional.pad(x, (self.window - 1, 0), value=self.pad)
        ctx = torch.stack([padded[:, k : k + x.shape[1]] for k in range(self.window)], dim=-1)
        h = torch.tanh(self.hidden(self.emb(ctx).flatten(-2)))
        return self.out(h)


@pytest.fixture(scope="module")
def memorised():
    secrets = generate_secrets(FMT, 4, seed=1)  # secret 0 inserted 20 times; 1-3 never
    base = list(FMT.sample(150, np.random.default_rng(0)))  # random digits: nothing to learn
    x = torch.as_tensor(np.stack(insert_secrets(base, secrets[:1], 20, seed=0)))
    model = TinyLM(12)
    opt = torch.optim.Adam(model.parameters(), 2e-2)
    for _ in range(120):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 12), x[:, 1:].reshape(-1)).backward()
        opt.step()
    return model, secrets


def test_tiny_lm_memorises_the_inserted_secret(memorised):
    model, secrets = memorised
    model.train()
    res = measure_exposure(model, secrets, FMT)
    assert model.training  # mode restored
    # inserted: near the maximum log2(10^4) = 13.3.  Not inserted: 1.44 bits on average for a
    # model that learnt nothing about them, > 8 bits with probability 1/256 each; an unseen secret
    # sharing leading digits with the inserted one is raised by the memorised transitions, so the
    # bound is 8 rather than the few bits of pure chance.
    assert res.exposure[0] > 12.0, res.exposure
    assert (res.exposure[1:] < 8.0).all(), res.exposure
    assert res.extrapolated[0] > 8.0 and (res.extrapolated[1:] < 8.0).all(), res.extrapolated
    sampled = measure_exposure(model, secrets, FMT, n_references=2000, enumerate_limit=100, seed=2)
    assert not sampled.enumerated and sampled.exposure[0] > 10.0  # at most log2(2001) = 10.97


def test_log_perplexity_accepts_logits_attribute_and_rejects_bad_models():
    class HF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Unigram(torch.zeros(12))

        def forward(self, x):
            return type("Out", (), {"logits": self.inner(x)})()

    seq = np.array([[10, 11, 1, 2, 3, 4]])
    assert log_perplexity(HF(), seq)[0] == pytest.approx(5 * math.log2(12))

    class Flat(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 12)

    with pytest.raises(ValueError, match="next-token logits"):
        log_perplexity(Flat(), seq)
    with pytest.raises(TypeError):
        log_perplexity(lambda x: x, seq)
    with pytest.raises(ValueError):
        log_perplexity(HF(), np.array([1, 2, 3]))
    with pytest.raises(ValueError):
        measure_exposure(HF(), np.array([[0, 11, 1, 2, 3, 4]]), FMT)  # wrong fixed token
    with pytest.raises(TypeError):
        SecretFormat([1, "a"], vocab=[1])
    with pytest.raises(ValueError):
        SecretFormat([1, 2], vocab=[1])  # no slot


@pytest.mark.gpu
def test_log_perplexity_of_a_cuda_model_equals_cpu():
    w = torch.cat([-torch.arange(10.0), torch.zeros(2)]).double()
    seq = FMT.sample(20, np.random.default_rng(0))
    np.testing.assert_allclose(log_perplexity(Unigram(w).cuda(), seq), log_perplexity(Unigram(w), seq), rtol=1e-12)
