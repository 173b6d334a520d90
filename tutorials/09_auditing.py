# %% [markdown]
# # Auditing DP-SGD: an empirical lower bound beside the ledger's upper bound
#
# The ledger gives an **upper** bound on epsilon: a proof that, if the code does what the analysis
# assumes, no attacker can do better.  An **audit** gives a **lower** bound: an attack actually run
# on the trained model, whose success rate no `(eps, delta)`-DP mechanism with a smaller `eps`
# could reach (with stated confidence).  If the lower bound ever exceeds the upper bound, the
# implementation breaks its promise.  If it sits far below, nothing is proven either way: the
# attack may just be weak.
#
# We use the **one-run audit** of Steinke, Nasr and Jagielski (2023):
#
# 1. create `m` *gradient canaries*: per-example gradients `C e_j`, each on its own coordinate
#    `j` of the model (Dirac canaries), and include each in training with probability 1/2;
# 2. train once; an included canary is one more record of the data set, Poisson-sampled at the
#    same rate `q`, clipped and noised like every example;
# 3. score each canary by how much the released gradients pushed its coordinate, guess "in" for
#    the highest scores and "out" for the lowest, and count the correct guesses;
# 4. turn the count into `eps >= X` at 95% confidence with the paper's analysis.
#
# We audit the small CNN of `pytorch-privacy demo` at several noise multipliers and compare with
# the ledger's claim.

# %%
import math
import os

import torch
from torch import nn

from pytorch_privacy.auditing.one_run import DEFAULT_GUESS_FRACTIONS, audit_training, one_run_epsilon_lower_bound
from pytorch_privacy.demo import DigitsCNN, load_digits_tensors
from pytorch_privacy.optimizer import DPGaussianOptimizer

FAST = os.environ.get("TUTORIAL_FAST") == "1"  # CI runs the tutorials with fewer steps
torch.set_num_threads(1)  # a small model: one thread is fastest

x_train, y_train, x_test, y_test, source = load_digits_tensors(seed=0)
print(f"data: {source}; {len(y_train)} training images")

# %% [markdown]
# ## One audited training run
#
# `audit_training` takes the model, a factory for *your* private optimizer (it passes the ledger,
# whose population counts the included canaries), the data and the sampling rate.  It returns the
# lower bound and, in `extra["claimed"]`, the ledger's RDP and PLD upper bounds for the same run.

# %%
Q = 64 / len(y_train)  # expected batch 64, as in the demo
EPOCHS = 4 if FAST else 15
M = 1000  # canaries; the model has 9,258 coordinates, so each canary gets its own
DELTA = 1e-5


def make_optimizer_factory(sigma: float):
    def make(model: nn.Module, ledger) -> DPGaussianOptimizer:
        return DPGaussianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            model,
            nn.CrossEntropyLoss(reduction="none"),
            l2_norm_clip=1.0,
            noise_multiplier=sigma,
            ledger=ledger,
            generator=torch.Generator().manual_seed(1),
        )

    return make


def audit(sigma: float):
    torch.manual_seed(0)
    return audit_training(
        DigitsCNN(), make_optimizer_factory(sigma), x_train, y_train,
        sample_rate=Q, epochs=EPOCHS, m=M, kind="dirac", delta=DELTA, confidence=0.95, seed=0,
    )


result = audit(1.0)
print(result.summary())
print("ledger upper bounds:", {k: round(v, 3) for k, v in result.extra["claimed"].items()})

# %% [markdown]
# Reading it: `k+` canaries with the highest scores were guessed "in", `k-` with the lowest "out"
# (the audit tries a fixed grid of `k` and pays for the choice with a Bonferroni correction, so the
# 95% stays honest).  `correct/guesses` is the attack's accuracy on the guesses it made.

# %%
print(f"k+ = k- = {result.k_plus}; {result.correct}/{result.guesses} correct ({100 * result.accuracy:.1f}%)")

# %% [markdown]
# ## Several noise levels
#
# `sigma = 0` is no privacy at all (the ledger says `eps = inf`): the canaries stand out and the
# audit certifies a large epsilon, limited only by the number of canaries.  With noise, the lower
# bound must stay below the claim; it typically sits well below it.

# %%
import warnings  # noqa: E402

SIGMAS = [0.0, 0.5, 1.0, 2.0]
rows = []
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="infinite privacy loss")  # sigma = 0
    for sigma in SIGMAS:
        r = result if sigma == 1.0 else audit(sigma)
        claimed = r.extra["claimed"]
        rows.append((sigma, claimed.get("rdp", math.inf), claimed.get("pld", math.inf), r.epsilon_lower_bound))

print(f"{'sigma':>6} {'claimed eps (RDP)':>18} {'claimed eps (PLD)':>18} {'empirical eps >=':>17}")
for sigma, rdp, pld, low in rows:
    print(f"{sigma:6.1f} {rdp:18.3f} {pld:18.3f} {low:17.3f}")
    assert low <= min(rdp, pld), "an empirical lower bound above the claimed epsilon: a privacy bug"
assert rows[0][3] > rows[-1][3]  # no noise leaks more than sigma = 2

# %% [markdown]
# ## Empirical against claimed epsilon
#
# The dashed diagonal is where a perfect audit would land.  Steinke et al. report about 1.8
# against a claimed 4 in one white-box run of a Wide ResNet on CIFAR-10; small models and few
# canaries give looser bounds, and `m` canaries can certify at most a limited epsilon (about 5.8
# for 1000 canaries all guessed right at delta = 0 and 95%; a little less with the grid of `k`).

# %%
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # the [plot] extra
    plt = None
    print("matplotlib not installed: pip install 'pytorch_privacy[plot]' for the figure")

if plt is not None:
    finite = [(s, pld, low) for s, _, pld, low in rows if math.isfinite(pld)]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([s[1] for s in finite], [s[2] for s in finite], "o-", label="one-run audit (95%)")
    for s, pld, low in finite:
        ax.annotate(f"sigma={s:g}", (pld, low), textcoords="offset points", xytext=(4, 4), fontsize=8)
    xs = [min(s[1] for s in finite) / 1.5 * 1.2**i for i in range(40)]
    xs = [x for x in xs if x <= max(s[1] for s in finite) * 1.5]
    ax.plot(xs, xs, "k--", lw=0.8, label="lower = upper (a perfect audit)")
    # every guess right, at the Bonferroni-corrected level the audit's grid of k uses
    ceiling = one_run_epsilon_lower_bound(M, M, M, delta=DELTA, confidence=1 - 0.05 / len(DEFAULT_GUESS_FRACTIONS))
    ax.axhline(ceiling, color="gray", ls=":", label=f"most {M} canaries can certify ({ceiling:.1f})")
    ax.set_ylim(0, ceiling * 1.15)
    ax.set_xscale("log")
    ax.set_xlabel("claimed epsilon (ledger, PLD)")
    ax.set_ylabel("empirical epsilon lower bound")
    ax.set_title(f"digits CNN, {M} canaries, delta = {DELTA:g}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig("09_auditing.png", dpi=100)
    print("saved 09_auditing.png")
