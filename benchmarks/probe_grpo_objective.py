"""What does GRPO-DT optimise, and does it? Scores checkpoints or saved run states on GRPO-DT's own objective.

For every checkpoint given (a pretrained checkpoint or a `state*.pt` that `grpo_dt.py --keep-states` kept):
- `--episodes` deterministic tanh(mean) episodes at each of `--rtgs` (normalized score +- s.e., length);
- with `--sampled-episodes N`: N sampled episodes at g_online (length, return), the episodes that give reset points;
- GRPO-DT's objective on FIXED reset points: N_fixed sampled episodes of the FIRST checkpoint at g_online are recorded
  once; 512 reset points are drawn from them once (`collect_groups` with a fixed rng), and every checkpoint is scored
  from those same states and the same action noise: the mean discounted group reward (L_traj sampled + L_eval
  tanh(mean) steps, Table 6's gamma), the undiscounted return over those steps and how long the members last.

Prints figures; it is not a test.

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/probe_grpo_objective.py \
        CKPT runs/RUN/state_it0005.pt runs/RUN/state_it0010.pt ...
"""

import sys
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo_dt  # noqa: E402


@dataclass
class Args:
    checkpoints: tyro.conf.Positional[list[str]]
    """checkpoints or run states; the first one also gives the fixed reset points"""
    env_id: str = "Hopper-v4"
    """gymnasium id"""
    dataset: str = "local/hopper/medium-v0"
    """picks the Table 6 row (g_online, L_traj, L_eval, gamma)"""
    episodes: int = 20
    """deterministic evaluation episodes per RTG"""
    rtgs: list[float] = field(default_factory=lambda: [3600.0, 7200.0])
    """RTGs of the deterministic episodes (raw return units)"""
    sampled_episodes: int = 0
    """sampled episodes at g_online per checkpoint (0: none)"""
    fixed_episodes: int = 16
    """sampled episodes of the first checkpoint that give the fixed reset points (0: skip the objective)"""
    seed: int = 1
    """seed of the reset points, the action noise and the episodes' resets"""
    eval_len: Optional[int] = None
    """score the objective with this L_eval instead of Table 6's (e.g. to the time limit)"""
    gamma: Optional[float] = None
    """score the objective with this discount instead of Table 6's"""
    hold_rtg: bool = False
    """also run the deterministic episodes with the RTG token held at its start value (never decremented)"""


def actor_of(path: str, c_online: int, max_steps: int, seed: int):
    model, ckpt = grpo_dt.load_model(path)
    actor = grpo_dt.Actor(
        model=model.eval(),
        state_mean=ckpt["state_mean"],
        state_std=ckpt["state_std"],
        rtg_scale=ckpt["rtg_scale"],
        c=c_online,
        max_steps=max_steps,
        gen=torch.Generator().manual_seed(seed),
    )
    return actor, ckpt


def score_line(ev: dict, ckpt: dict) -> str:
    """Normalized score +- s.e. and mean length of deterministic episodes."""
    scores = 100 * (ev["reward"].sum(1) - ckpt["ref_min_score"]) / (ckpt["ref_max_score"] - ckpt["ref_min_score"])
    return f"{scores.mean():.1f} +- {scores.std() / np.sqrt(len(scores)):.1f} ({ev['valid'].sum(1).mean():.0f} steps)"


def main(args: Args):
    torch.set_num_threads(1)
    family, key = grpo_dt.env_family(args.env_id)
    run = grpo_dt.Args(env_id=args.env_id, dataset=args.dataset, seed=args.seed)
    grpo_dt.apply_presets(run, family, key)
    run.eval_len = run.eval_len if args.eval_len is None else args.eval_len
    run.gamma = run.gamma if args.gamma is None else args.gamma
    print(f"objective: L_traj {run.subtraj_len} + L_eval {run.eval_len}, gamma {run.gamma}")
    max_steps = grpo_dt.make_env(args.env_id).spec.max_episode_steps
    n_members = run.trajs_per_iter * run.reset_points * run.group_size
    envs = grpo_dt.EnvPool(args.env_id, max(n_members, args.episodes, args.sampled_episodes, args.fixed_episodes))
    first, ckpt = actor_of(args.checkpoints[0], run.c_online, max_steps, args.seed)
    if args.fixed_episodes:
        seeds = grpo_dt.train_seeds(np.random.default_rng(args.seed), args.fixed_episodes)
        out, params = grpo_dt.run_episodes(first, envs, seeds, run.g_online, stochastic=True, record_sim=True)
        fixed = deque(grpo_dt.store_trajectories(out, params, ckpt["rtg_scale"]), maxlen=run.full_buffer_size)
        print(f"fixed reset points from {args.fixed_episodes} sampled episodes of lengths {[len(t['reward']) for t in fixed]}")
    for path in args.checkpoints:
        actor, ckpt = actor_of(path, run.c_online, max_steps, args.seed)
        iteration = ckpt["finetune"]["iteration"] if "finetune" in ckpt else 0
        row = [f"{Path(path).name} (iteration {iteration})"]
        for rtg in args.rtgs:
            ev, _ = grpo_dt.run_episodes(actor, envs, grpo_dt.eval_seeds(args.seed, args.episodes), rtg, stochastic=False)
            row.append(f"RTG {rtg:.0f}: {score_line(ev, ckpt)}")
        for rtg in args.rtgs if args.hold_rtg else []:
            # The token stays rtg * rtg_scale while each step subtracts reward * rtg_scale * 1e-9, i.e. nothing.
            held = replace(actor, rtg_scale=actor.rtg_scale * 1e-9)
            ev, _ = grpo_dt.run_episodes(held, envs, grpo_dt.eval_seeds(args.seed, args.episodes), rtg * 1e9, stochastic=False)
            row.append(f"held RTG {rtg:.0f}: {score_line(ev, ckpt)}")
        if args.sampled_episodes:
            seeds = grpo_dt.train_seeds(np.random.default_rng(args.seed + 1), args.sampled_episodes)
            out, _ = grpo_dt.run_episodes(actor, envs, seeds, run.g_online, stochastic=True)
            row.append(
                f"sampled at {run.g_online:.0f}: {out['valid'].sum(1).mean():.0f} steps, return "
                f"{out['reward'].sum(1).mean():.0f}"
            )
        if args.fixed_episodes:
            _, rewards, _, out = grpo_dt.collect_groups(actor, envs, fixed, run, np.random.default_rng(args.seed))
            row.append(
                f"objective {rewards.mean():.1f} +- {rewards.mean(1).std() / np.sqrt(len(rewards)):.1f} (undiscounted "
                f"{out['reward'].sum(1).mean():.0f}, members last {out['valid'].sum(1).mean():.0f} steps)"
            )
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
