"""What a pretrained DT's Gaussian head does on states whose dataset action sits on the +-1 bound, and on its own rollouts.

For every dataset step (at the checkpoint's evaluation context, with the dataset's own RTG tokens), per action dimension,
split by whether the dataset action is on the bound (|a| = 1) or interior:
  |mean|            the pre-tanh mean's magnitude
  log_std           the pre-tanh log-std
  sat               the fraction of steps where the evaluation action |tanh(mean)| > 0.99
  mse               the squared error of tanh(mean) against the dataset action
Then deterministic evaluation episodes (as `pretrain_dt.evaluate`), with the same quantities on the states visited,
the episode lengths and returns. Prints figures; it is not a test.

    MINARI_DATASETS_PATH=$(realpath data/minari) python benchmarks/diagnose_bounds.py --checkpoint CKPT
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrain_dt as pt  # noqa: E402


@dataclass
class Args:
    checkpoint: str
    """a pretrain_dt.py checkpoint"""
    dataset: str = ""
    """Minari id of the data to inspect; default the checkpoint's own"""
    eval_episodes: int = 10
    """deterministic episodes to inspect"""
    seed: int = 10_001
    """first reset seed of the episodes"""


def load(path):
    if not Path(path).is_file():
        sys.exit(f"error: --checkpoint {path} is not a file")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = {k: v for k, v in ckpt["model_config"].items() if k not in ("activation", "c_offline")}
    model = pt.DecisionTransformer(**{**cfg, "dropout": 0.0})
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def head_stats(mean, log_std, split=None):
    """Per-dimension |mean|, log_std, saturated fraction; restricted to `split` (a bool mask per step and dim)."""
    sat = (torch.tanh(mean).abs() > 0.99).float()
    rows = {}
    for name, x in (("|mean|", mean.abs()), ("log_std", log_std), ("sat", sat)):
        if split is None:
            rows[name] = x.mean(0).numpy()
        else:
            rows[name] = np.array(
                [x[split[:, d], d].mean().item() if split[:, d].any() else np.nan for d in range(x.shape[1])]
            )
    return rows


@torch.no_grad()
def dataset_heads(model, ckpt, trajs):
    """mean, log_std (N, A) at every dataset step, from the c_eval tokens before it (left-padded), dataset RTGs."""
    K = ckpt["eval_context_len"]
    sampler = pt.SegmentSampler(
        trajs, K, ckpt["state_mean"].numpy(), ckpt["state_std"].numpy(), ckpt["rtg_scale"], np.random.default_rng(0)
    )
    n = sampler.lengths.sum()
    traj_of_step = np.repeat(np.arange(len(trajs)), sampler.lengths)
    step_in_traj = np.arange(n) - sampler.offsets[traj_of_step]
    j = np.arange(K)[None, :] - (K - 1)  # window offsets ..., -1, 0
    src = np.arange(n)[:, None] + j
    real = (step_in_traj[:, None] + j) >= 0
    src = np.where(real, src, 0)
    rtg = torch.as_tensor(np.where(real, sampler.rtg[src], 0.0)[..., None], dtype=torch.float32)
    states = torch.as_tensor(np.where(real[..., None], sampler.states[src], 0.0), dtype=torch.float32)
    actions = torch.as_tensor(np.where(real[..., None], sampler.actions[src], 0.0), dtype=torch.float32)
    means, log_stds = [], []
    for lo in range(0, n, 4096):
        m, s = model(
            rtg[lo : lo + 4096], states[lo : lo + 4096], actions[lo : lo + 4096], torch.as_tensor(real[lo : lo + 4096])
        )
        means.append(m[:, -1]), log_stds.append(s[:, -1])
    return torch.cat(means), torch.cat(log_stds), torch.as_tensor(sampler.actions)


def main(args: Args):
    torch.set_num_threads(1)
    model, ckpt = load(args.checkpoint)
    _, trajs, ref_min, ref_max = pt.load_dataset(ckpt["env_id"], args.dataset or ckpt["dataset_id"], None, 0, 0)
    mean, log_std, data_act = dataset_heads(model, ckpt, trajs)
    on_bound = data_act.abs() >= 1.0
    np.set_printoptions(precision=2, suppress=True)
    print(f"{args.checkpoint}: dataset {args.dataset or ckpt['dataset_id']}, evaluation context {ckpt['eval_context_len']}")
    print(f"  dataset actions on the bound, per dim (%): {(on_bound.float().mean(0) * 100).numpy()}")
    for label, split in (("dataset steps, action on the bound", on_bound), ("dataset steps, action interior", ~on_bound)):
        rows = head_stats(mean, log_std, split)
        print(f"  {label:<36} " + "  ".join(f"{k} {v}" for k, v in rows.items()))
    sq_err = (torch.tanh(mean) - data_act) ** 2
    print(f"  tanh(mean) MSE vs data: on-bound {sq_err[on_bound].mean():.3f}, interior {sq_err[~on_bound].mean():.3f}")

    rets, lengths, m, s = episodes(model, ckpt, args.eval_episodes, args.seed)
    scores = pt.normalized_score(rets, ref_min, ref_max)
    print(
        f"  evaluation: normalized {scores.mean():.1f} +- {scores.std() / np.sqrt(len(scores)):.1f} (s.e.), "
        f"returns {np.round(rets).astype(int)}, lengths {lengths}"
    )
    rows = head_stats(m, s)
    print(f"  {'evaluation states':<36} " + "  ".join(f"{k} {v}" for k, v in rows.items()))


@torch.no_grad()
def episodes(model, ckpt, n, seed):
    """Deterministic tanh(mean) episodes one at a time, as `pretrain_dt.evaluate` steps them; the head on visited states."""
    K, rets, lengths, means, log_stds = ckpt["eval_context_len"], [], [], [], []
    state_mean, state_std = ckpt["state_mean"], ckpt["state_std"]
    env = pt.make_env(ckpt["env_id"])
    for i in range(n):
        obs, done, ret, t = env.reset(seed=seed + i)[0], False, 0.0, 0
        rtg, states = torch.zeros(1, K, 1), torch.zeros(1, K, len(state_mean))
        actions = torch.zeros(1, K, model.mean_head.out_features)
        mask, target = torch.zeros(1, K, dtype=torch.bool), ckpt["eval_rtg"] * ckpt["rtg_scale"]
        while not done:
            rtg, states, actions, mask = (x.roll(-1, dims=1) for x in (rtg, states, actions, mask))
            states[0, -1] = (torch.as_tensor(obs, dtype=torch.float32) - state_mean) / state_std
            rtg[0, -1, 0], actions[0, -1], mask[0, -1] = target, 0.0, True
            mean, log_std = (x[:, -1] for x in model(rtg, states, actions, mask))
            means.append(mean), log_stds.append(log_std)
            actions[0, -1] = torch.tanh(mean[0])
            obs, r, term, trunc, _ = env.step(torch.tanh(mean[0]).numpy())
            ret, t, target, done = ret + r, t + 1, target - r * ckpt["rtg_scale"], term or trunc
        rets.append(ret), lengths.append(t)
    return np.array(rets), lengths, torch.cat(means), torch.cat(log_stds)


if __name__ == "__main__":
    main(tyro.cli(Args))
