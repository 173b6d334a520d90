# %% [markdown]
# # DP-SGD on handwritten digits, stopped by a privacy budget
#
# We train a small classifier on scikit-learn's `digits` images (1797 grey 8x8 images, bundled
# with scikit-learn, so nothing is downloaded) with DP-SGD (Abadi et al. 2016):
#
# * `DPDataLoader` draws **Poisson** batches: every training image joins a batch independently
#   with probability `q`, which is what the privacy analysis assumes;
# * `DPGaussianOptimizer` clips every per-example gradient to `C`, sums, adds Gaussian noise of
#   stddev `sigma * C` and divides by the *expected* batch size `q * N`;
# * a `PrivacyLedger` records every step;
# * `target_epsilon` makes the optimizer refuse the first step that would take the cumulative
#   epsilon above the budget, raising `PrivacyBudgetExceeded` *before* anything is released.
#
# At the end we compare with the same model trained without privacy.

# %%
import os
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm.auto import tqdm  # progress bar (pip install 'pytorch_privacy[examples]')

from pytorch_privacy.analysis import compute_epochs
from pytorch_privacy.dp_query import PrivacyLedger
from pytorch_privacy.optimizer import DPDataLoader, DPGaussianOptimizer, PrivacyBudgetExceeded

FAST = os.environ.get("TUTORIAL_FAST") == "1"  # CI runs the tutorials with fewer steps
torch.manual_seed(0)

# %% [markdown]
# ## Data: 80 % train, 20 % test
#
# Pixels are scaled to [0, 1] and each image is flattened to 64 features.

# %%
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target, dtype=torch.long)
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
n_test = len(y) // 5
x_test, y_test = x[perm[:n_test]], y[perm[:n_test]]
x_train, y_train = x[perm[n_test:]], y[perm[n_test:]]
N = len(y_train)
print(f"train {N} images, test {n_test} images")


def make_model() -> nn.Module:
    torch.manual_seed(1)  # same initialisation for the private and the non-private run
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def accuracy(model: nn.Module) -> float:
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


# %% [markdown]
# ## The private training plan
#
# Expected batch size 64 gives the sampling rate `q = 64 / N`.  With noise multiplier 1.3 and
# a budget of epsilon = 4 at delta = 1e-5 (well below `1/N`), `compute_epochs` says how long we
# can train *before* we start.  The optimizer enforces the same budget step by step, so we can
# simply loop "forever" and let it stop us.

# %%
batch_size = 64
q = batch_size / N
noise_multiplier, l2_norm_clip = 1.3, 1.0
target_epsilon, delta = 4.0, 1e-5

planned_steps = compute_epochs(N, batch_size, noise_multiplier, target_epsilon, delta, unit="steps")
print(f"q = {q:.4f}; the budget allows about {planned_steps} steps ({planned_steps * q:.1f} epochs)")

# %% [markdown]
# ## Optimizer, loader and ledger
#
# `metrics_callback` receives a dict after every step; with a budget attached it contains the
# running `epsilon` (computed from the ledger by an RDP accountant), plus the clip, the fraction
# of clipped examples and quantiles of the per-example gradient norms.  The loss must be
# *per example* (`reduction="none"`): the optimizer needs one loss per record.

# %%
model = make_model()
ledger = PrivacyLedger(N, q, metadata={"tutorial": "02_dp_sgd_digits"})
history: list[dict] = []
optimizer = DPGaussianOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    model,
    nn.CrossEntropyLoss(reduction="none"),
    l2_norm_clip=l2_norm_clip,
    noise_multiplier=noise_multiplier,
    ledger=ledger,  # the average divides by ledger.expected_batch_size = q * N
    target_epsilon=target_epsilon,
    target_delta=delta,
    metrics_callback=history.append,
    # seeded so this tutorial's checks are reproducible; in real training leave it out (the
    # noise generator is then seeded from OS entropy, or use secure_mode=True)
    generator=torch.Generator().manual_seed(12),
)
loader = DPDataLoader(
    torch.utils.data.TensorDataset(x_train, y_train),
    sample_rate=q,
    generator=torch.Generator().manual_seed(2),
)
print(f"{len(loader)} Poisson batches per epoch, expected size {loader.expected_batch_size:.0f}")

# %% [markdown]
# ## Train until the budget says stop
#
# The loop has no epoch limit: `fit_batch` raises `PrivacyBudgetExceeded` before the first
# step that would exceed epsilon = 4.  That step is neither applied, nor noised, nor recorded,
# so the ledger holds exactly the steps that were released.

# %%
t0 = time.perf_counter()
epoch = 0
try:
    while True:
        epoch += 1
        for xb, yb in tqdm(loader, desc=f"epoch {epoch}", leave=False):  # Poisson batches: sizes vary
            optimizer.fit_batch(xb, yb)
        m = history[-1]
        print(
            f"epoch {epoch:2d}  steps {len(ledger):4d}  loss {m['loss']:.3f}  "
            f"clipped {m['clipped_fraction']:.2f}  test acc {accuracy(model):.3f}  epsilon {m['epsilon']:.3f}"
        )
except PrivacyBudgetExceeded as stop:
    print(f"\nstopped cleanly: {stop}")
    refused_eps = stop.epsilon
private_seconds = time.perf_counter() - t0
private_acc = accuracy(model)
spent = optimizer.epsilon
print(
    f"private model: test accuracy {private_acc:.3f} after {len(ledger)} steps "
    f"({private_seconds:.1f}s), epsilon spent {spent:.3f} <= {target_epsilon} at delta {delta:g}"
)

# %% [markdown]
# The ledger agrees with the optimizer: every released step is in it, and its epsilon is the
# one the budget enforced.  The refused step would have crossed the budget.  The accountant
# used by the budget keeps a fixed grid of RDP orders, while `compute_epochs` optimises the order
# continuously, so the enforced run can be a little shorter than the plan, never longer.

# %%
print(ledger.summary())
assert len(ledger) == optimizer.steps > 0
assert spent <= target_epsilon < refused_eps
assert 0.8 * planned_steps <= len(ledger) <= planned_steps
assert history[-1]["epsilon"] == spent

# %% [markdown]
# ## The non-private baseline
#
# The same model, the same number of epochs, plain SGD on shuffled batches.

# %%
baseline = make_model()
sgd = torch.optim.SGD(baseline.parameters(), lr=0.1, momentum=0.9)
plain_loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True
)
loss_fn = nn.CrossEntropyLoss()
for _ in range(epoch if not FAST else min(epoch, 10)):
    for xb, yb in plain_loader:
        sgd.zero_grad()
        loss_fn(baseline(xb), yb).backward()
        sgd.step()
baseline_acc = accuracy(baseline)
print(f"non-private test accuracy {baseline_acc:.3f}   private ({spent:.2f}, {delta:g})-DP: {private_acc:.3f}")

# %% [markdown]
# Privacy costs a few points of accuracy on this small dataset: about 1400 training images is
# very little for DP-SGD, since the noise is divided by the expected batch size and the budget
# limits how many batches we may draw.  Both models are far above chance (10 %).

# %%
assert baseline_acc > 0.9
assert private_acc > 0.85
assert private_acc <= baseline_acc + 0.02
