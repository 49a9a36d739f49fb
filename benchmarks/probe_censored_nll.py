"""Probe (issue #17): `pretrain_dt.py` with on-bound dataset actions scored as the point mass they are.

A dataset action exactly on ±1 (behaviour noise clipped to the bound) is, under ODT's recipe, the tanh-Gaussian's
density at the clamp point atanh(1 − 1e-6) = ±7.25 in pre-tanh space; fitting it pulls the mean out and inflates σ.
Here such an action dimension is scored instead by the probability that the policy lands at or past
`--censor-bound` on that side, P(tanh(u) >= b) = Φ((mean − atanh b) / σ) for +1 (a censored likelihood, as in a
Tobit model); interior dimensions keep `pretrain_dt.py`'s density. Everything else is `pretrain_dt.py` unchanged:
the same flags, training, evaluation and checkpoint. The finetuning scripts still score actions by the density, so
this measures pretraining only; it is a probe, not a recipe.

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/bench_dt_vs_bc.py --config-name censored099 \
        --dt-script benchmarks/probe_censored_nll.py --dt-flags="--censor-bound 0.99" \
        --datasets Hopper-v4:local/hopper/medium-v0 --bc none --seeds 6 --parallel 2
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro
from torch.distributions import Normal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrain_dt  # noqa: E402

ON_BOUND = 1 - 1e-6  # a float32 dataset action at or past this is on the bound (clipped data hold exactly ±1)


@dataclass
class Args(pretrain_dt.Args):
    censor_bound: float = 0.99
    """an action dimension on ±1 is scored as P(tanh(u) beyond ±censor_bound), u ~ N(mean, σ) the pre-tanh action"""


def censored_action_log_prob(mean, log_std, actions, margin: float, bound: float):
    """Sum over action dims of: log Φ(±(mean − atanh bound) / σ) where the action is on ±1, else the tanh-Gaussian's
    log density of the action clamped to ±(1 − margin) (equal, dimension by dimension, to `action_log_prob`)."""
    std = log_std.exp()
    u = torch.atanh(actions.clamp(-1 + margin, 1 - margin))
    # log |d tanh(u) / du| = log(1 - tanh(u)^2), in the stable form torch's TanhTransform uses
    log_det = 2 * (math.log(2) - u - F.softplus(-2 * u))
    density = Normal(mean, std, validate_args=False).log_prob(u) - log_det
    c = math.atanh(bound)
    upper = torch.special.log_ndtr((mean - c) / std)
    lower = torch.special.log_ndtr((-c - mean) / std)
    per_dim = torch.where(actions >= ON_BOUND, upper, torch.where(actions <= -ON_BOUND, lower, density))
    return per_dim.sum(-1)


def main(args: Args):
    if not 0 < args.censor_bound < 1:
        raise pretrain_dt.UserError(f"--censor-bound must lie strictly between 0 and 1, got {args.censor_bound}")

    def log_prob(mean, log_std, actions, margin):
        return censored_action_log_prob(mean, log_std, actions, margin, args.censor_bound)

    pretrain_dt.action_log_prob = log_prob  # dt_loss looks it up at call time; nothing else in pretraining uses it
    return pretrain_dt.main(args)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except pretrain_dt.UserError as e:
        sys.exit(f"error: {e}")
