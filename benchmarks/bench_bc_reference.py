"""Reference point for the pretraining target: what plain behaviour cloning scores on the same data.

An MLP (2 x 256, ReLU) regresses tanh(output) on the dataset actions with MSE, then is evaluated exactly as
`pretrain_dt.py` evaluates a DT: the same `evaluate` (deterministic, batched, the same reset seeds), the same
state normalisation and normalized score. If BC cannot beat the dataset's average either, a DT that matches BC
is limited by the data at that scale, not by a bug. Prints figures; it is not a test.

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/bench_bc_reference.py
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrain_dt as pt  # noqa: E402


@dataclass
class Args:
    env_id: str = "Hopper-v4"
    """gymnasium env id"""
    dataset: str = "local/hopper/medium-v0"
    """Minari id"""
    seeds: int = 3
    """runs, seeds first_seed..first_seed+seeds-1"""
    first_seed: int = 1
    """the first run's seed"""
    updates: int = 10_000
    """Adam updates per run"""
    batch_size: int = 256
    """states per update"""
    eval_every: int = 2000
    """updates between evaluations"""
    eval_episodes: int = 10
    """evaluation episodes per point"""


class MarkovPolicy(nn.Module):
    """An MLP behind the DT's call signature, so `pretrain_dt.evaluate` runs it unchanged (context 1)."""

    def __init__(self, state_dim, act_dim, hidden=256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, act_dim)
        )

    def forward(self, rtg, states, actions, pad_mask):
        mean = self.net(states)
        return mean, torch.zeros_like(mean)


def main(args: Args):
    torch.set_num_threads(1)
    _, trajs, ref_min, ref_max = pt.load_dataset(args.env_id, args.dataset, None, 0, 0)
    obs = np.concatenate([t["observations"] for t in trajs])
    mean, std = obs.mean(0).astype(np.float32), obs.std(0).astype(np.float32) + 1e-6
    states = torch.as_tensor((obs - mean) / std)
    actions = torch.as_tensor(np.concatenate([t["actions"] for t in trajs]))
    meta = dict(context_len=1, state_mean=mean, state_std=std, rtg_scale=1e-3, eval_rtg=0.0)
    envs = [pt.make_env(args.env_id) for _ in range(args.eval_episodes)]
    scores = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        torch.manual_seed(seed)
        policy = MarkovPolicy(states.shape[1], actions.shape[1])
        opt = torch.optim.Adam(policy.parameters(), lr=3e-4)
        scores[seed] = {}
        for update in range(1, args.updates + 1):
            idx = torch.randint(len(states), (args.batch_size,))
            loss = ((torch.tanh(policy.net(states[idx])) - actions[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if update % args.eval_every == 0:
                rets = pt.evaluate(policy, envs, meta, pt.eval_seeds(seed, args.eval_episodes), "cpu")
                scores[seed][update] = float(pt.normalized_score(rets, ref_min, ref_max).mean())
        print(f"seed {seed}: " + ", ".join(f"{u}: {s:.1f}" for u, s in scores[seed].items()), flush=True)
    last = np.array([list(s.values())[-3:] for s in scores.values()])
    print(
        f"MLP BC (MSE) on {args.dataset}, mean of the last 3 evaluations over {args.seeds} seeds: "
        f"{last.mean():.1f} (per seed {last.mean(1).round(1)})"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
