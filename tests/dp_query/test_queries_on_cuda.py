"""CUDA variants: device and dtype kept, CPU-seeded noise reproducible, no host syncs per step."""

import numpy as np
import pytest
import torch

from pytorch_privacy.dp_query import (
    GaussianSumQuery,
    NestedQuery,
    NoPrivacyAverageQuery,
    NoPrivacySumQuery,
    QuantileAdaptiveClipSumQuery,
    QuantileEstimatorQuery,
)

from ._records import clipped_sum64, leaves, random_record, rows64, weighted_sum_fn

pytestmark = [
    pytest.mark.gpu,
]


def cuda(tree):
    if isinstance(tree, torch.Tensor):
        return tree.cuda()
    if isinstance(tree, dict):
        return {k: cuda(v) for k, v in tree.items()}
    return type(tree)(cuda(v) for v in tree)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_sum_on_cuda(dtype):
    batch = random_record("dict", 0, scale=2.0, dtype=dtype, batch=16)
    template = random_record("dict", 1, dtype=dtype)
    q = GaussianSumQuery(1.0, 0.0)
    s = q.accumulate_records(1.0, q.initial_sample_state(cuda(template)), cuda(batch))
    result, _, _ = q.get_noised_result(s, q.initial_global_state())
    for l in leaves(result):
        assert l.is_cuda and l.dtype == dtype
    got = np.concatenate([l.cpu().double().numpy().reshape(-1) for l in leaves(result)])
    np.testing.assert_allclose(got, clipped_sum64(rows64(batch), 1.0), rtol=1e-5, atol=1e-5)
    # by norm
    norms = torch.tensor(np.linalg.norm(rows64(batch), axis=1), dtype=dtype).cuda()
    s2 = q.accumulate_records_by_norm(1.0, q.initial_sample_state(cuda(template)), norms, weighted_sum_fn(cuda(batch)))
    for x, y in zip(leaves(s2), leaves(s)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_cpu_generator_noise_on_cuda_matches_cpu():
    template = [torch.zeros(1000), torch.zeros(10, 10)]
    q_cpu = GaussianSumQuery(1.0, 0.5, generator=torch.Generator().manual_seed(3))
    q_gpu = GaussianSumQuery(1.0, 0.5, generator=torch.Generator().manual_seed(3))
    r_cpu, _, _ = q_cpu.get_noised_result(q_cpu.initial_sample_state(template), q_cpu.initial_global_state())
    r_gpu, _, _ = q_gpu.get_noised_result(q_gpu.initial_sample_state(cuda(template)), q_gpu.initial_global_state())
    for a, b in zip(r_cpu, r_gpu):
        assert b.is_cuda
        assert torch.equal(a, b.cpu())


def test_cuda_generator_reproducible():
    def run():
        q = GaussianSumQuery(1.0, 1.0, generator=torch.Generator(device="cuda").manual_seed(8))
        r, _, _ = q.get_noised_result(q.initial_sample_state(torch.zeros(100, device="cuda")), q.initial_global_state())
        return r

    a, b = run(), run()
    assert a.is_cuda and torch.equal(a, b)
    assert abs(float(a.std()) - 1.0) < 0.3


def test_adaptive_clip_on_cuda_matches_cpu_and_stays_on_device():
    def run(device):
        q = QuantileAdaptiveClipSumQuery(1.0, 0.0, 0.5, 0.2, 0.0, 64)
        gs = q.initial_global_state()
        rng = np.random.default_rng(0)
        for _ in range(30):
            batch = torch.tensor(rng.standard_normal((64, 3)), dtype=torch.float32, device=device)
            p = q.derive_sample_params(gs)
            s = q.accumulate_records(p, q.initial_sample_state(batch[0]), batch)
            result, gs, _ = q.get_noised_result(s, gs)
        return result, gs, q

    r_cpu, gs_cpu, _ = run("cpu")
    r_gpu, gs_gpu, q = run("cuda")
    assert r_gpu.is_cuda and gs_gpu.sum_state.l2_norm_clip.is_cuda
    torch.testing.assert_close(r_gpu.cpu(), r_cpu, rtol=1e-5, atol=1e-5)
    assert q.derive_metrics(gs_gpu)["l2_norm_clip"] == pytest.approx(q.derive_metrics(gs_cpu)["l2_norm_clip"], rel=1e-6)


def test_adaptive_clip_step_has_no_host_sync():
    """The by-norm path never syncs.  The batched path refuses non-finite records, which reads
    the norms on the host (one documented sync per batch), unless the caller has masked them
    (``records_known_finite``, as the DP optimizer does); that refusal still works on CUDA."""
    from pytorch_privacy.dp_query.pytree import records_known_finite

    q = QuantileAdaptiveClipSumQuery(1.0, 1.1, 0.5, 0.2, 3.0, 64)
    gs = q.initial_global_state()
    batch = torch.randn(64, 5, device="cuda")
    norms = batch.norm(dim=1)
    ws = weighted_sum_fn(batch)
    bad = batch.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="record 3 has a NaN entry"):
        q.accumulate_records(q.derive_sample_params(gs), q.initial_sample_state(batch[0]), bad)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            p = q.derive_sample_params(gs)
            s = q.initial_sample_state(batch[0])
            with records_known_finite():
                s = q.accumulate_records(p, s, batch)
            s = q.accumulate_records_by_norm(p, s, norms, ws)
            _, gs, _ = q.get_noised_result(s, gs)
        with pytest.raises(RuntimeError):  # control: the detector does catch a sync
            q.derive_metrics(gs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gs.sum_state.l2_norm_clip.is_cuda


def test_quantile_estimator_and_no_privacy_on_cuda():
    est = QuantileEstimatorQuery(1.0, 0.5, 0.2, 0.0, 4)
    gs = est.initial_global_state()
    v = torch.tensor([0.5, 0.7, 2.0, 3.0], device="cuda")
    s = est.accumulate_records(est.derive_sample_params(gs), est.initial_sample_state(v), v)
    new, gs, _ = est.get_noised_result(s, gs)
    assert new.is_cuda and float(new) == pytest.approx(1.0)  # half below: no move

    avg = NoPrivacyAverageQuery()
    s = avg.accumulate_records((), avg.initial_sample_state(torch.zeros(2, device="cuda")), torch.ones(3, 2, device="cuda"))
    r, _, _ = avg.get_noised_result(s, ())
    assert r.is_cuda and r.tolist() == [1.0, 1.0]

    nq = NestedQuery({"a": NoPrivacySumQuery(), "b": GaussianSumQuery(1.0, 0.0)})
    rec = {"a": torch.ones(4, 2, device="cuda"), "b": torch.full((4, 1), 3.0, device="cuda")}
    p = nq.derive_sample_params(nq.initial_global_state())
    s = nq.accumulate_records(p, nq.initial_sample_state({"a": torch.zeros(2, device="cuda"), "b": torch.zeros(1, device="cuda")}), rec)
    r, _, _ = nq.get_noised_result(s, nq.initial_global_state())
    assert r["a"].is_cuda and r["a"].tolist() == [4.0, 4.0] and r["b"].tolist() == [4.0]
