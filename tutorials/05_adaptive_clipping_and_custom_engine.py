# %% [markdown]
# # Adaptive clipping, physical batches, frozen parameters and a custom gradient engine
#
# Four features of `DPOptimizer` that go beyond the basic DP-SGD loop:
#
# 1. **Adaptive clipping** (Andrew et al. 2021): `QuantileAdaptiveClipSumQuery` moves the clip
#    norm towards a quantile of the per-example gradient norms, privately;
# 2. **gradient accumulation across physical batches**: `max_physical_batch_size` splits a
#    logical batch into chunks that fit in memory without changing the released gradient;
# 3. **frozen parameters**: only parameters with `requires_grad=True` are differentiated,
#    clipped and noised, which makes private fine-tuning of a small adapter (LoRA-style) cheap;
# 4. **a custom per-example gradient engine**, registered with `register_engine`.

# %%
import copy
import os

import torch
from sklearn.datasets import load_digits
from torch import nn

from pytorch_privacy.analysis import RdpAccountant
from pytorch_privacy.dp_query import (
    NormalizedQuery,
    PrivacyLedger,
    QuantileAdaptiveClipSumQuery,
    combined_noise_multiplier,
    compute_sum_noise_multiplier,
)
from pytorch_privacy.optimizer import (
    DPDataLoader,
    DPGaussianOptimizer,
    DPOptimizer,
    GradientEngine,
    MaterializedGradients,
    available_engines,
    register_engine,
)

FAST = os.environ.get("TUTORIAL_FAST") == "1"  # CI runs the tutorials with fewer steps
torch.manual_seed(0)

digits = load_digits()
x_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y_all = torch.tensor(digits.target, dtype=torch.long)
perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
x_all, y_all = x_all[perm], y_all[perm]
delta = 1e-5


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


# %% [markdown]
# ## 1. Adaptive clipping
#
# A fixed clip norm is a guess: too small and every gradient is shrunk (bias), too large and
# the noise, proportional to the clip, drowns the signal.  `QuantileAdaptiveClipSumQuery`
# privately counts, at every step, how many examples had a gradient norm below the current
# clip, and moves the clip geometrically towards the `target_unclipped_quantile` (here the
# median).  The count is itself a Gaussian release (noise `sigma_b`, in records), so the step's
# event is the composition of two Gaussian mechanisms on the same sample.
# `compute_sum_noise_multiplier` raises the sum's noise just enough that the pair costs exactly
# as much as plain DP-SGD with noise multiplier `z_total`.
#
# The query returns a *sum*; `NormalizedQuery` divides it by the public expected batch size.

# %%
N = len(y_all)
q = 64 / N
expected_batch = q * N
z_total = 1.1
sigma_b = expected_batch / 20  # the paper's recommendation
z_sum = compute_sum_noise_multiplier(z_total, sigma_b)
print(f"noise multiplier of the sum {z_sum:.4f}, of the count {2 * sigma_b:.1f}; together {z_total}")
assert abs(combined_noise_multiplier(z_sum, sigma_b) - z_total) < 1e-12

initial_clip = 0.05  # deliberately far too small
query = NormalizedQuery(
    QuantileAdaptiveClipSumQuery(
        initial_l2_norm_clip=initial_clip,
        noise_multiplier=z_sum,
        target_unclipped_quantile=0.5,
        learning_rate=0.2,
        clipped_count_stddev=sigma_b,
        expected_num_records=expected_batch,
        generator=torch.Generator().manual_seed(15),  # reproducible tutorial; leave out in real training
    ),
    denominator=expected_batch,
)
model = mlp()
ledger = PrivacyLedger(N, q)
history: list[dict] = []
opt = DPOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    model,
    nn.CrossEntropyLoss(reduction="none"),
    query,
    ledger=ledger,
    metrics_callback=history.append,
)
loader = DPDataLoader(torch.utils.data.TensorDataset(x_all, y_all), sample_rate=q, generator=torch.Generator().manual_seed(1))
print(f"{'step':>5}  {'clip':>6}  {'median norm':>11}  {'clipped':>7}")
for epoch in range(4 if FAST else 10):
    for xb, yb in loader:
        opt.fit_batch(xb, yb)
        m = history[-1]
        if len(history) % 20 == 1:
            print(f"{len(history):5d}  {m['query/l2_norm_clip']:6.3f}  {m['grad_norm_p50']:11.3f}  {m['clipped_fraction']:7.2f}")

# %% [markdown]
# The clip climbed from 0.05 to the scale of the gradient norms within a few dozen steps, and
# then followed the norms down as the model converged.  It trails them: one update changes the
# clip by a factor of at most `exp(learning_rate / 2)`, about 10 %, while the norms shrink
# quickly early in training.  So somewhat fewer than half of the examples get clipped; once
# the norms settle, the clip settles near their median.

# %%
clips = [m["query/l2_norm_clip"] for m in history]
medians = [m["grad_norm_p50"] for m in history]
late = slice(len(history) // 2, None)
fraction_clipped = sum(m["clipped_fraction"] for m in history[late]) / len(history[late])
print(f"largest clip {max(clips):.3f}; over the second half of training {fraction_clipped:.2f} of the examples were clipped")
assert max(clips) > 20 * initial_clip
print(f"final clip {clips[-1]:.3f}, final median gradient norm {medians[-1]:.3f}")
assert clips[-1] < 0.5 * max(clips)  # it came down with the norms
assert 0.2 < fraction_clipped < 0.8

# %% [markdown]
# The ledger records the composed event `(sum, count)`.  Its privacy cost equals plain DP-SGD
# with noise multiplier `z_total` for the same steps: adaptivity is paid for by a slightly
# noisier sum, not by a larger epsilon.

# %%
print(ledger.summary())
eps_adaptive = RdpAccountant().compose_ledger(ledger).get_epsilon(delta)
plain = PrivacyLedger(N, q)
plain.record_gaussian_sample(z_total, count=len(ledger))
eps_plain = RdpAccountant().compose_ledger(plain).get_epsilon(delta)
print(f"adaptive clipping: epsilon {eps_adaptive:.4f}; plain DP-SGD with noise {z_total}: {eps_plain:.4f}")
assert abs(eps_adaptive - eps_plain) < 1e-6 * eps_plain

# %% [markdown]
# ## 2. Physical batches: the same step in smaller pieces
#
# A logical batch is the unit of sampling, clipping and noise.  With
# `max_physical_batch_size=k` the optimizer computes per-example gradients `k` examples at a
# time, clips them, adds the clipped sums of the chunks (`merge_sample_states`) and draws the
# noise once.  The released gradient, and so the privacy analysis, are those of the whole
# batch: with the same noise seed, both optimizers below take the same step (up to float
# rounding).

# %%
batch_x, batch_y = x_all[:200], y_all[:200]
results = []
for physical in (None, 32):
    torch.manual_seed(3)
    net = mlp()
    dp = DPGaussianOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1),
        net,
        nn.CrossEntropyLoss(reduction="none"),
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=200,
        max_physical_batch_size=physical,
        generator=torch.Generator().manual_seed(4),  # same noise for both
    )
    dp.fit_batch(batch_x, batch_y)
    results.append({n: p.detach().clone() for n, p in net.named_parameters()})
max_diff = max((results[0][n] - results[1][n]).abs().max().item() for n in results[0])
print(f"largest parameter difference, one batch of 200 vs 7 chunks of at most 32: {max_diff:.2e}")
assert max_diff < 1e-5

# %% [markdown]
# ## 3. Frozen parameters: private fine-tuning of a low-rank adapter
#
# A common recipe: pretrain on public data, then fine-tune privately only a few parameters.
# Here the digits 0-4 play the public dataset and the digits 5-9 the private one.  The
# pretrained hidden layer is frozen and given a rank-4 adapter `up(down(x))` (LoRA, Hu et al.
# 2021); the adapter and a new head are the only trainable parameters.  Frozen parameters are
# neither differentiated nor noised, and their `.grad` stays `None`.


# %%
class LoRALinear(nn.Module):
    """``base(x) + up(down(x))`` with ``base`` frozen and ``up`` initialised to zero."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


public = y_all < 5
x_pub, y_pub = x_all[public], y_all[public]
x_priv, y_priv = x_all[~public], y_all[~public] - 5
n_test = len(y_priv) // 4
x_priv_test, y_priv_test = x_priv[:n_test], y_priv[:n_test]
x_priv, y_priv = x_priv[n_test:], y_priv[n_test:]

torch.manual_seed(5)
backbone = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
pretrain = nn.Sequential(backbone, nn.Linear(64, 5))
sgd = torch.optim.SGD(pretrain.parameters(), lr=0.1, momentum=0.9)
for _ in range(30):  # public data: ordinary training, no privacy needed
    for i in range(0, len(y_pub), 64):
        sgd.zero_grad()
        nn.functional.cross_entropy(pretrain(x_pub[i : i + 64]), y_pub[i : i + 64]).backward()
        sgd.step()
pretrain.zero_grad(set_to_none=True)

backbone.requires_grad_(False)
backbone[2] = LoRALinear(backbone[2], rank=4)  # trainable adapter inside the frozen backbone
finetune = nn.Sequential(backbone, nn.Linear(64, 5))  # new trainable head
frozen_before = {n: p.detach().clone() for n, p in finetune.named_parameters() if not p.requires_grad}
trainable = [n for n, p in finetune.named_parameters() if p.requires_grad]
n_trainable = sum(p.numel() for p in finetune.parameters() if p.requires_grad)
n_total = sum(p.numel() for p in finetune.parameters())
print(f"trainable: {trainable}")
print(f"{n_trainable} of {n_total} parameters are trained (and noised)")

N_priv = len(y_priv)
q_priv = 32 / N_priv
ledger_ft = PrivacyLedger(N_priv, q_priv)
opt_ft = DPGaussianOptimizer(
    torch.optim.SGD([p for p in finetune.parameters() if p.requires_grad], lr=0.2, momentum=0.9),
    finetune,
    nn.CrossEntropyLoss(reduction="none"),
    l2_norm_clip=1.0,
    noise_multiplier=1.0,
    ledger=ledger_ft,
    generator=torch.Generator().manual_seed(16),  # reproducible tutorial; leave out in real training
)
loader_ft = DPDataLoader(
    torch.utils.data.TensorDataset(x_priv, y_priv), sample_rate=q_priv, generator=torch.Generator().manual_seed(6)
)
for _ in range(5 if FAST else 15):
    for xb, yb in loader_ft:
        opt_ft.fit_batch(xb, yb)

with torch.no_grad():
    acc_ft = (finetune(x_priv_test).argmax(1) == y_priv_test).float().mean().item()
eps_ft = RdpAccountant().compose_ledger(ledger_ft).get_epsilon(delta)
print(f"private fine-tuning: test accuracy on digits 5-9 {acc_ft:.3f}, ({eps_ft:.2f}, {delta:g})-DP, {len(ledger_ft)} steps")
for n, p in finetune.named_parameters():
    if not p.requires_grad:
        assert p.grad is None and torch.equal(p, frozen_before[n]), n
assert finetune[0][2].up.weight.abs().sum() > 0  # the adapter did move
assert acc_ft > 0.8

# %% [markdown]
# ## 4. A custom per-example gradient engine
#
# Engines turn `(model, loss_fn, inputs, targets)` into per-example gradients.  The built-in
# ones are `ghost` (ghost norms and book-keeping, never materialising per-example gradients
# where that is cheaper), `functorch` (`vmap(grad)`, any vmappable model) and `loop` (one
# example at a time, any model).  `engine="auto"` picks the highest-priority engine that
# supports the model.
#
# A new engine subclasses `GradientEngine`, states which models it supports, implements
# `compute`, and is registered with `register_engine`; the optimizer does not change.  Ours
# handles a bare `nn.Linear` (multinomial logistic regression) with the classic outer-product
# trick (Goodfellow 2015): the loss of example `i` depends on the weights only through its own
# output `z_i = W x_i + b`, so its gradient is `g_i x_i^T` for `W` and `g_i` for `b`, with
# `g_i = d loss_i / d z_i`, and one backward pass gives every `g_i` at once.


# %%
@register_engine
class LinearOuterProductEngine(GradientEngine):
    """Per-example gradients of a bare ``nn.Linear`` from one backward pass."""

    name = "linear_outer_product"
    priority = -10  # below the built-in engines: "auto" never prefers it

    @classmethod
    def unsupported_reason(cls, model: nn.Module):
        if type(model) is not nn.Linear:
            return "handles a bare nn.Linear only"
        return None

    def compute(self, inputs, targets, *, microbatch_size=None):
        if microbatch_size not in (None, 1):
            raise ValueError(f"{self.name} does not support microbatches")
        with torch.enable_grad():
            z = self.model(inputs)
            losses = self.loss_fn(z, targets)
            (g,) = torch.autograd.grad(losses.sum(), z)  # row i is d loss_i / d z_i
        params = self.trainable_parameters()
        grads = {}
        if "weight" in params:
            grads["weight"] = g[:, :, None] * inputs[:, None, :]
        if "bias" in params:
            grads["bias"] = g
        return MaterializedGradients(grads, losses.detach())


assert "linear_outer_product" in available_engines()
torch.manual_seed(7)
linear = nn.Linear(64, 10)
loss_fn = nn.CrossEntropyLoss(reduction="none")


def per_example(engine: str) -> dict[str, torch.Tensor]:
    o = DPGaussianOptimizer(
        torch.optim.SGD(linear.parameters(), lr=0.1),
        linear,
        loss_fn,
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        expected_batch_size=64,
        engine=engine,
    )
    return o.per_example_gradients(x_all[:64], y_all[:64]).materialize()


ours, reference = per_example("linear_outer_product"), per_example("functorch")
for name in ("weight", "bias"):
    assert torch.allclose(ours[name], reference[name], atol=1e-6), name
print("the custom engine agrees with the functorch engine on every per-example gradient")

# %% [markdown]
# It trains like any other engine:

# %%
ledger_lin = PrivacyLedger(N, q)
opt_lin = DPGaussianOptimizer(
    torch.optim.SGD(linear.parameters(), lr=0.5, momentum=0.5),
    linear,
    loss_fn,
    l2_norm_clip=1.0,
    noise_multiplier=1.0,
    ledger=ledger_lin,
    engine="linear_outer_product",
    generator=torch.Generator().manual_seed(17),  # reproducible tutorial; leave out in real training
)
for _ in range(3 if FAST else 10):
    for xb, yb in loader:
        opt_lin.fit_batch(xb, yb)
with torch.no_grad():
    acc_lin = (linear(x_all).argmax(1) == y_all).float().mean().item()
print(f"private logistic regression with the custom engine: accuracy {acc_lin:.3f} after {len(ledger_lin)} steps")
assert acc_lin > 0.8
