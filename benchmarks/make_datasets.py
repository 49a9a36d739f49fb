"""Extra datasets for the pretraining benchmark, in a writable Minari root beside the shared one.

The shared root is read-only, so this makes `data/minari/` (git-ignored): a symlink `local -> $MINARI_DATASETS_PATH/local`
(the shared sets, read in place) plus two generated Hopper sets:

- `generated/hopper/noisy-v0`, bound-heavy: an MLP behaviour-cloning policy fitted here on `local/hopper/medium-v0`,
  rolled out with Gaussian action noise (sigma 0.5 by default) and clipped to +-1, so far more of its action values
  sit exactly on the bounds than in the shared set (the printed table gives the fractions per dimension);
- `generated/hopper/random-v0`: uniform random actions, made by `pretrain_dt.py`'s own generator (`--dataset random`);
- with `--teacher CKPT`, `generated/hopper/teacher-noisy-v0`: a stronger policy (a pretrained DT checkpoint, acting
  tanh(mean) at its evaluation context and RTG) with Gaussian action noise `--teacher-noise`, clipped to +-1: the
  shape of "expert rollouts with action noise", whose saturated actions put many targets on the bounds.

Everything is seeded, but the sets are not bit-identical across machines or torch thread counts (README, Actions on
the bounds). Prints the sets' statistics.

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/make_datasets.py
    export MINARI_DATASETS_PATH=$(realpath data/minari)   # then every script sees all four sets
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pretrain_dt as pt  # noqa: E402


@dataclass
class Args:
    root: str = str(ROOT / "data" / "minari")
    """the writable Minari root to create"""
    noise: float = 0.5
    """std of the Gaussian action noise of the bound-heavy set, before clipping to +-1"""
    episodes: int = 250
    """episodes of the bound-heavy set (the shared medium set has 250)"""
    bc_updates: int = 10_000
    """Adam updates of the MLP behaviour-cloning policy that generates the bound-heavy set"""
    random_steps: int = 100_000
    """env steps of the random set"""
    seed: int = 0
    """seed of the BC fit, the noise and the env resets"""
    teacher: str = ""
    """a pretrain_dt.py checkpoint to roll out for the teacher-noisy set (skipped when empty)"""
    teacher_noise: float = 0.3
    """std of the Gaussian action noise of the teacher-noisy set, before clipping to +-1"""


def fit_bc_policy(states: torch.Tensor, actions: torch.Tensor, updates: int) -> nn.Module:
    """A 2x256 ReLU MLP regressing tanh(output) on the actions with MSE (as `bench_dt_vs_bc.py`'s MLP)."""
    policy = nn.Sequential(
        nn.Linear(states.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, actions.shape[1]), nn.Tanh()
    )
    opt = torch.optim.Adam(policy.parameters(), lr=3e-4)
    for _ in range(updates):
        idx = torch.randint(len(states), (256,))
        loss = ((policy(states[idx]) - actions[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy


def noisy_episodes(policy, env, state_mean, state_std, noise, episodes, rng):
    """Episodes of clip(policy(s) + N(0, noise^2), -1, 1), as Minari `EpisodeBuffer`s (whole arrays: no jax)."""
    from minari.data_collector import EpisodeBuffer

    buffers = []
    for ep in range(episodes):
        obs, acts, rews, terms, truncs = [env.reset(seed=int(rng.integers(2**31)))[0]], [], [], [], []
        done = False
        while not done:
            with torch.no_grad():
                mean = policy(torch.as_tensor((obs[-1] - state_mean) / state_std, dtype=torch.float32)).numpy()
            action = np.clip(mean + noise * rng.standard_normal(mean.shape), -1.0, 1.0).astype(np.float32)
            o, r, term, trunc, _ = env.step(action)
            obs.append(o), acts.append(action), rews.append(float(r)), terms.append(bool(term)), truncs.append(bool(trunc))
            done = term or trunc
        buffers.append(
            EpisodeBuffer(
                observations=np.array(obs),
                actions=np.array(acts),
                rewards=rews,
                terminations=terms,
                truncations=truncs,
                infos={},
            )
        )
    return buffers


@torch.no_grad()
def teacher_episodes(ckpt_path, noise, episodes, rng, batch=25):
    """Episodes of clip(tanh(mean) + N(0, noise^2), -1, 1) from a DT checkpoint, `batch` envs in lockstep."""
    from minari.data_collector import EpisodeBuffer

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ckpt.get("format_version") != pt.CHECKPOINT_FORMAT_VERSION:
        sys.exit(
            f"error: --teacher {ckpt_path} is checkpoint format {ckpt.get('format_version')}, not "
            f"{pt.CHECKPOINT_FORMAT_VERSION}: pretrain it again with pretrain_dt.py"
        )
    cfg = {k: v for k, v in ckpt["model_config"].items() if k not in ("activation", "c_offline")}
    model = pt.DecisionTransformer(**{**cfg, "dropout": 0.0}).eval()
    model.load_state_dict(ckpt["state_dict"])
    K, S, A = ckpt["eval_context_len"], cfg["state_dim"], cfg["act_dim"]
    envs, buffers = [pt.make_env(ckpt["env_id"]) for _ in range(batch)], []
    for _ in range(episodes // batch):
        obs = [[e.reset(seed=int(rng.integers(2**31)))[0]] for e in envs]
        acts, rews, terms, truncs = ([[] for _ in envs] for _ in range(4))
        rtg, states, actions = torch.zeros(batch, K, 1), torch.zeros(batch, K, S), torch.zeros(batch, K, A)
        mask = torch.zeros(batch, K, dtype=torch.bool)
        target = torch.full((batch,), ckpt["eval_rtg"] * ckpt["rtg_scale"])
        alive = np.ones(batch, bool)
        while alive.any():
            rtg, states, actions, mask = (x.roll(-1, dims=1) for x in (rtg, states, actions, mask))
            states[:, -1] = (torch.as_tensor(np.stack([o[-1] for o in obs]), dtype=torch.float32) - ckpt["state_mean"]) / ckpt[
                "state_std"
            ]
            rtg[:, -1, 0], actions[:, -1], mask[:, -1] = target, 0.0, True
            mean, _ = model(rtg, states, actions, mask)
            act = np.clip(torch.tanh(mean[:, -1]).numpy() + noise * rng.standard_normal((batch, A)), -1, 1).astype(np.float32)
            actions[:, -1] = torch.as_tensor(act)
            for i in np.flatnonzero(alive):
                o, r, term, trunc, _ = envs[i].step(act[i])
                obs[i].append(o), acts[i].append(act[i]), rews[i].append(float(r)), terms[i].append(bool(term))
                truncs[i].append(bool(trunc))
                target[i] -= r * ckpt["rtg_scale"]
                alive[i] = not (term or trunc)
        buffers += [
            EpisodeBuffer(
                observations=np.array(obs[i]),
                actions=np.array(acts[i]),
                rewards=rews[i],
                terminations=terms[i],
                truncations=truncs[i],
                infos={},
            )
            for i in range(batch)
        ]
    return buffers


def describe(dataset_id: str, env_id: str):
    _, trajs, ref_min, ref_max = pt.load_dataset(env_id, dataset_id, None, 0, 0)
    acts = np.concatenate([t["actions"] for t in trajs])
    rets = np.array([t["rewards"].sum() for t in trajs])
    on_bound = (np.abs(acts) >= 1.0).mean(0) * 100
    print(
        f"{dataset_id:<28} {len(trajs):>4} episodes {len(acts):>7} steps  normalized "
        f"{pt.normalized_score(rets.mean(), ref_min, ref_max):5.1f}  actions on +-1 (%): {np.round(on_bound, 1)}"
    )


def write_hopper_set(dataset_id: str, buffers, algorithm: str, description: str):
    """A Hopper-v4 Minari dataset from episode buffers, with D4RL's Hopper reference scores."""
    import minari

    ref_min, ref_max = pt.D4RL_REF["hopper"]
    minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        env="Hopper-v4",
        algorithm_name=algorithm,
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        description=description,
    )


def main(args: Args):
    import minari

    shared = Path(os.environ.get("MINARI_DATASETS_PATH", ROOT.parent / "shared" / "datasets")).resolve()
    if args.teacher and not Path(args.teacher).is_file():
        sys.exit(f"error: --teacher {args.teacher} is not a file")
    root = Path(args.root).resolve()
    if root == shared:
        sys.exit(f"error: --root {root} is the shared (read-only) root; pass another folder")
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "local").exists():
        (root / "local").symlink_to(shared / "local", target_is_directory=True)
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)

    if "generated/hopper/noisy-v0" not in minari.list_local_datasets():
        _, trajs, _, _ = pt.load_dataset("Hopper-v4", "local/hopper/medium-v0", None, 0, 0)
        obs = np.concatenate([t["observations"] for t in trajs])
        state_mean, state_std = obs.mean(0), obs.std(0) + 1e-6
        policy = fit_bc_policy(
            torch.as_tensor((obs - state_mean) / state_std, dtype=torch.float32),
            torch.as_tensor(np.concatenate([t["actions"] for t in trajs])),
            args.bc_updates,
        )
        env = pt.make_env("Hopper-v4")
        write_hopper_set(
            "generated/hopper/noisy-v0",
            noisy_episodes(policy, env, state_mean, state_std, args.noise, args.episodes, rng),
            algorithm=f"MLP BC + N(0, {args.noise}^2), clipped",
            description=f"bound-heavy: a BC policy of local/hopper/medium-v0 with Gaussian action noise {args.noise}, clipped",
        )
    if "generated/hopper/random-v0" not in minari.list_local_datasets():
        pt.generate_random_dataset("generated/hopper/random-v0", "Hopper-v4", "hopper", args.random_steps, args.seed)
    if args.teacher and "generated/hopper/teacher-noisy-v0" not in minari.list_local_datasets():
        write_hopper_set(
            "generated/hopper/teacher-noisy-v0",
            teacher_episodes(args.teacher, args.teacher_noise, args.episodes, rng),
            algorithm=f"DT teacher + N(0, {args.teacher_noise}^2), clipped",
            description=f"bound-heavy: {args.teacher} with Gaussian action noise {args.teacher_noise}, clipped",
        )
    sets = ["local/hopper/medium-v0", "local/door/human-v0", "generated/hopper/noisy-v0", "generated/hopper/random-v0"]
    teacher_set = "generated/hopper/teacher-noisy-v0"
    sets += [teacher_set] if teacher_set in minari.list_local_datasets() else []
    for dataset_id in sets:
        describe(dataset_id, "AdroitHandDoor-v1" if "door" in dataset_id else "Hopper-v4")
    print(f"export MINARI_DATASETS_PATH={root}")


if __name__ == "__main__":
    main(tyro.cli(Args))
