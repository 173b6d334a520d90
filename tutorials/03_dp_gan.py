# %% [markdown]
# # A differentially private GAN: sensitive and public passes in one step
#
# A GAN touches the private data in one place only: the discriminator's loss on *real*
# examples.  Everything else is public:
#
# * the discriminator's loss on *fake* examples depends on the generator and on random noise,
#   not on the private data;
# * the generator is trained through the discriminator, which is already private, so its steps
#   are post-processing and cost nothing.
#
# `DPOptimizer`'s multi-pass API expresses exactly this.  One discriminator step is
#
# ```python
# opt_d.zero_grad()
# opt_d.backward_pass(real, ones, sensitive=True)    # per-example gradients, clipped, noised
# opt_d.backward_pass(fake, zeros, sensitive=False)  # plain mean gradient, added as is
# opt_d.step()                                       # noise once, one ledger entry
# ```
#
# and the generator uses an ordinary `torch.optim` optimizer.  The ledger counts one sample
# per discriminator step and nothing for the generator.  (Private GANs in this style:
# Xie et al. 2018, "Differentially private generative adversarial network"; Torkzadehmahani
# et al. 2019, "DP-CGAN".)

# %%
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm  # progress bar (pip install 'pytorch_privacy[examples]')

from pytorch_privacy.analysis import RdpAccountant, compute_pld_from_ledger
from pytorch_privacy.dp_query import GaussianEvent, PrivacyLedger
from pytorch_privacy.optimizer import DPGaussianOptimizer, PoissonSampler

FAST = os.environ.get("TUTORIAL_FAST") == "1"  # CI runs the tutorials with fewer steps
torch.manual_seed(0)

# %% [markdown]
# ## Private data: a mixture of four Gaussians in the plane
#
# 20 000 points around four centres on a circle of radius 2.  The centres are what the
# generator should discover.

# %%
N, K = 20_000, 4
angles = torch.arange(K) * 2 * math.pi / K
centres = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
real_data = centres[torch.randint(0, K, (N,))] + 0.15 * torch.randn(N, 2)

# %% [markdown]
# ## Two small networks
#
# The discriminator returns one logit per point.  Its loss must be *per example* (shape
# `[B]`), because the optimizer clips every example's gradient on its own.

# %%
Z = 4
generator = nn.Sequential(nn.Linear(Z, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
discriminator = nn.Sequential(
    nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1)
)


def bce_per_example(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.squeeze(-1), target, reduction="none")


def quality(n: int = 2000) -> tuple[float, float, int]:
    """Mean distance from a generated point to the nearest centre, fraction within 0.5 of a
    centre, and how many centres receive such points."""
    with torch.no_grad():
        d = torch.cdist(generator(torch.randn(n, Z)), centres)
    dist, nearest = d.min(dim=1)
    close = dist < 0.5
    return dist.mean().item(), close.float().mean().item(), len(set(nearest[close].tolist()))


# %% [markdown]
# ## The private discriminator optimizer and the public generator optimizer
#
# Real batches are Poisson samples (expected size 256, so `q = 256 / N`); the ledger records
# each discriminator step under that sampling.  The generator's optimizer is plain Adam.

# %%
batch = 256
q = batch / N
ledger = PrivacyLedger(N, q, metadata={"tutorial": "03_dp_gan"})
opt_d = DPGaussianOptimizer(
    torch.optim.Adam(discriminator.parameters(), lr=5e-3, betas=(0.5, 0.999)),
    discriminator,
    bce_per_example,
    l2_norm_clip=1.0,
    noise_multiplier=1.0,
    ledger=ledger,
    # seeded so this tutorial's checks are reproducible; in real training leave it out (OS entropy)
    generator=torch.Generator().manual_seed(13),
)
opt_g = torch.optim.Adam(generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
sampler = PoissonSampler(N, q, generator=torch.Generator().manual_seed(1))

# %% [markdown]
# ## Training
#
# Each iteration: one private discriminator step (a sensitive pass on real points and a
# public pass on fake points, released together), then one public generator step with the
# non-saturating loss `-log D(G(z))`.  The generator's backward pass also leaves gradients in
# the discriminator's `.grad`; they are never used, because `opt_d.zero_grad()` clears them and
# `opt_d.step()` only applies what the passes accumulated.

# %%
steps = 800 if FAST else 2000
start_quality = quality()
t0 = time.perf_counter()
for it in tqdm(range(1, steps + 1), desc="GAN steps", unit="step", mininterval=1.0):
    real = real_data[sampler.sample()]  # Poisson batch: variable size
    with torch.no_grad():
        fake = generator(torch.randn(batch, Z))

    opt_d.zero_grad()
    opt_d.backward_pass(real, torch.ones(len(real)), sensitive=True)
    opt_d.backward_pass(fake, torch.zeros(batch), sensitive=False)
    opt_d.step()

    recorded = len(ledger)
    opt_g.zero_grad()
    logits = discriminator(generator(torch.randn(batch, Z))).squeeze(-1)
    F.binary_cross_entropy_with_logits(logits, torch.ones(batch)).backward()
    opt_g.step()
    assert len(ledger) == recorded  # the generator step released nothing private

    if it % (steps // 4) == 0:
        dist, frac, covered = quality()
        tqdm.write(
            f"step {it:5d}  ledger {len(ledger):5d}  mean distance to a centre {dist:.3f}  "
            f"within 0.5: {frac:.2f}  centres covered {covered}/{K}  {time.perf_counter() - t0:.1f}s"
        )

# %% [markdown]
# ## What the ledger says
#
# One sample per discriminator step, whatever the number of passes in it, each a
# Poisson-sampled Gaussian mechanism with the discriminator's noise multiplier.

# %%
print(ledger.summary())
assert len(ledger) == steps == opt_d.steps
(run,) = ledger.runs
assert run.count == steps and run.sampling == "poisson" and run.event == GaussianEvent(1.0)

delta = 1e-5
eps_rdp = RdpAccountant().compose_ledger(ledger).get_epsilon(delta)
eps_pld = compute_pld_from_ledger(ledger).get_epsilon(delta)
print(f"the generator is ({eps_rdp:.2f}, {delta:g})-DP by RDP, ({eps_pld:.2f}, {delta:g})-DP by PLD")
assert eps_pld <= eps_rdp < 5

# %% [markdown]
# ## Did it learn the data?
#
# At initialisation the generator's points sit near the origin, about 2 away from every
# centre.  After training most of them lie close to the centres.

# %%
dist0, frac0, _ = start_quality
dist, frac, covered = quality()
print(f"before: mean distance {dist0:.3f}, within 0.5: {frac0:.2f}")
print(f"after:  mean distance {dist:.3f}, within 0.5: {frac:.2f}, centres covered {covered}/{K}")
assert dist < 0.5 * dist0
assert frac > 0.5 and covered >= 2
