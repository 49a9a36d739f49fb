"""A Walker2d dataset the project never tuned on: TD3 trained here, then rolled out with Gaussian action noise.

Data for GRPO-DT's hold-the-gain benchmark (bench_grpo_hold.py) from a policy trained here (the shared data has only
Hopper and Door, and `random` Walker2d data is vacuous: its DT cannot walk, so GRPO has nothing to hold). This trains a TD3
agent (Fujimoto et al. 2018; CleanRL's `td3_continuous_action.py` recipe: 2x256 MLPs, lr 3e-4, batch 256, gamma 0.99,
tau 0.005, target-policy noise 0.2 clipped at 0.5, actor every 2 updates, exploration noise 0.1) on Walker2d-v4 for
`--train-steps`, keeps its actor at `--actor-path` (training is skipped when that file exists), and writes
`generated/walker2d/td3-noisy-v0` into the writable Minari root: `--episodes` episodes of clip(actor(s) + N(0,
noise^2), -1, 1), a "medium"-like set. Time-limit ends bootstrap in the critic's target.
Everything is seeded. Prints the teacher's evaluations and the set's statistics.

    MINARI_DATASETS_PATH=$(realpath data/minari) python benchmarks/make_walker2d_dataset.py
"""

import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from make_datasets import describe, noisy_episodes  # noqa: E402

import pretrain_dt as pt  # noqa: E402

DATASET_ID = "generated/walker2d/td3-noisy-v0"


@dataclass
class Args:
    train_steps: int = 200_000
    """TD3 env steps (one update per step after --learning-starts)"""
    learning_starts: int = 10_000
    """uniform random env steps before the first update (CleanRL: 25000)"""
    eval_every: int = 25_000
    """deterministic evaluation of the actor every this many env steps (5 episodes)"""
    noise: float = 0.2
    """std of the Gaussian action noise of the dataset's rollouts, before clipping to +-1"""
    episodes: int = 200
    """episodes in the dataset"""
    actor_path: str = str(ROOT / "data" / "td3_walker2d_actor.pt")
    """where the trained actor is kept; training is skipped when it exists"""
    seed: int = 0
    """seed of TD3 (networks, exploration, resets) and of the dataset's rollouts"""


def mlp(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, n_out))


def evaluate(actor: nn.Module, env_id: str, episodes: int, seed: int) -> float:
    """Mean return of the deterministic actor over `episodes` episodes."""
    env, returns = pt.make_env(env_id), []
    for ep in range(episodes):
        obs, done, total = env.reset(seed=seed + ep)[0], False, 0.0
        while not done:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()
            obs, reward, term, trunc, _ = env.step(action)
            total, done = total + reward, term or trunc
        returns.append(total)
    return float(np.mean(returns))


def train_td3(args: Args, env_id: str) -> nn.Module:
    env = pt.make_env(env_id)
    S, A = env.observation_space.shape[0], env.action_space.shape[0]
    actor, critics = nn.Sequential(mlp(S, A), nn.Tanh()), nn.ModuleList([mlp(S + A, 1), mlp(S + A, 1)])
    actor_target, critics_target = copy.deepcopy(actor), copy.deepcopy(critics)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=3e-4)
    critic_opt = torch.optim.Adam(critics.parameters(), lr=3e-4)
    buf = {k: np.zeros((args.train_steps, d), np.float32) for k, d in (("s", S), ("a", A), ("r", 1), ("s2", S), ("d", 1))}
    rng = np.random.default_rng(args.seed)
    obs, start = env.reset(seed=args.seed)[0], time.time()
    for step in range(args.train_steps):
        if step < args.learning_starts:
            action = rng.uniform(-1, 1, A).astype(np.float32)
        else:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()
            action = np.clip(action + 0.1 * rng.standard_normal(A), -1, 1).astype(np.float32)
        next_obs, reward, term, trunc, _ = env.step(action)
        for k, v in (("s", obs), ("a", action), ("r", reward), ("s2", next_obs), ("d", term)):
            buf[k][step] = v  # "d" is termination only: a time-limit end bootstraps
        obs = env.reset()[0] if term or trunc else next_obs
        if step < args.learning_starts:
            continue
        idx = rng.integers(step + 1, size=256)
        s, a, r, s2, d = (torch.as_tensor(buf[k][idx]) for k in ("s", "a", "r", "s2", "d"))
        with torch.no_grad():
            noise = (0.2 * torch.randn_like(a)).clamp(-0.5, 0.5)
            a2 = (actor_target(s2) + noise).clamp(-1, 1)
            q_next = torch.min(*(q(torch.cat([s2, a2], 1)) for q in critics_target))
            target = r + 0.99 * (1 - d) * q_next
        critic_loss = sum(F.mse_loss(q(torch.cat([s, a], 1)), target) for q in critics)
        critic_opt.zero_grad()
        critic_loss.backward()
        critic_opt.step()
        if step % 2 == 0:
            actor_loss = -critics[0](torch.cat([s, actor(s)], 1)).mean()
            actor_opt.zero_grad()
            actor_loss.backward()
            actor_opt.step()
            with torch.no_grad():
                for net, target_net in ((actor, actor_target), (critics, critics_target)):
                    for p, tp in zip(net.parameters(), target_net.parameters()):
                        tp.lerp_(p, 0.005)
        if (step + 1) % args.eval_every == 0:
            score = evaluate(actor, env_id, episodes=5, seed=10_000)
            print(f"TD3 step {step + 1}: deterministic return {score:.0f} ({time.time() - start:.0f} s)", flush=True)
    return actor


def main(args: Args):
    import minari

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    env_id = "Walker2d-v4"
    actor_path = Path(args.actor_path)
    if actor_path.is_file():
        actor = torch.load(actor_path, weights_only=False)
        print(f"teacher: {actor_path} (delete it to train again)")
    else:
        actor = train_td3(args, env_id)
        actor_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(actor, f"{actor_path}.tmp")
        os.replace(f"{actor_path}.tmp", actor_path)
    print(f"teacher's deterministic return over 10 episodes: {evaluate(actor, env_id, episodes=10, seed=20_000):.0f}")
    if DATASET_ID not in minari.list_local_datasets():
        ref_min, ref_max = pt.D4RL_REF["walker2d"]
        rng = np.random.default_rng(args.seed)
        episodes = noisy_episodes(actor, pt.make_env(env_id), 0.0, 1.0, args.noise, args.episodes, rng)
        minari.create_dataset_from_buffers(
            DATASET_ID,
            episodes,
            env=env_id,
            algorithm_name=f"TD3 ({args.train_steps} steps) + N(0, {args.noise}^2), clipped",
            ref_min_score=ref_min,
            ref_max_score=ref_max,
            description=f"a TD3 actor trained here on {env_id} for {args.train_steps} steps, with Gaussian action "
            f"noise {args.noise}, clipped to +-1",
        )
    describe(DATASET_ID, env_id)


if __name__ == "__main__":
    main(tyro.cli(Args))
