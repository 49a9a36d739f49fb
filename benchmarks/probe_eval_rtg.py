"""Does a pretrained DT score higher when conditioned on another target return? (issue #17, the random set)

Evaluates each pretrain_dt.py checkpoint as `pretrain_dt.evaluate` does (tanh(mean) actions, the checkpoint's
evaluation context, the same reset seeds for every target) at each --rtgs target, and prints the normalized score's
mean and standard error per checkpoint and target, beside the dataset's best and 99th-percentile episode returns
(normalized) when the dataset is found. Prints figures; it is not a test.

    MINARI_DATASETS_PATH=$(realpath data/minari) python benchmarks/probe_eval_rtg.py \
        --checkpoints benchmarks/pretrain_out/dt_vs_bc/dt_censored099_generated-hopper-random-v0_s{1,2,3}.pt \
        --rtgs 3600 1000 231 100
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diagnose_bounds import load  # noqa: E402  (the same checkpoint loader)

import pretrain_dt as pt  # noqa: E402


@dataclass
class Args:
    checkpoints: tuple[str, ...]
    """pretrain_dt.py checkpoints (one env)"""
    rtgs: tuple[float, ...] = (3600.0, 1000.0, 231.0, 100.0)
    """target returns (raw, as --eval-rtg) to condition the evaluation episodes on"""
    episodes: int = 50
    """episodes per checkpoint and target"""
    context: int = 0
    """context of the evaluation episodes; 0: the checkpoint's evaluation context (c_online)"""
    seed: int = 1
    """reset seeds are pretrain_dt.eval_seeds(seed, episodes), the same for every checkpoint and target"""


def normalized(returns, ckpt):
    return 100 * (np.asarray(returns) - ckpt["ref_min_score"]) / (ckpt["ref_max_score"] - ckpt["ref_min_score"])


def dataset_returns(dataset_id):
    """Episode returns of the checkpoint's dataset, or None when it is not in the Minari root."""
    import minari

    try:
        return np.array([ep.rewards.sum() for ep in minari.load_dataset(dataset_id).iterate_episodes()])
    except Exception as err:  # not downloaded here: the probe still runs
        print(f"({dataset_id} not loaded: {type(err).__name__}; its returns are not printed)")
        return None


def main(args: Args):
    torch.set_num_threads(1)
    if missing := [c for c in args.checkpoints if not Path(c).is_file()]:
        sys.exit(f"error: --checkpoints names files that do not exist: {', '.join(missing)}")
    if args.context < 0:
        sys.exit(f"error: --context must be >= 1, or 0 for the checkpoint's own, got {args.context}")
    if args.episodes < 2:
        sys.exit(f"error: --episodes must be >= 2 (a standard error needs two), got {args.episodes}")
    seeds = pt.eval_seeds(args.seed, args.episodes)
    for i, path in enumerate(args.checkpoints):
        model, ckpt = load(path)
        if i == 0 and (data := dataset_returns(ckpt["dataset_id"])) is not None:
            best, p99 = normalized([data.max(), np.percentile(data, 99)], ckpt)
            print(
                f"{ckpt['dataset_id']}: {len(data)} episodes, best return {data.max():.0f} (normalized {best:.1f}), "
                f"99th percentile {np.percentile(data, 99):.0f} ({p99:.1f}), mean {normalized(data.mean(), ckpt):.1f}"
            )
        envs = [pt.make_env(ckpt["env_id"]) for _ in range(args.episodes)]
        row = []
        for rtg in args.rtgs:
            like = {k: ckpt[k] for k in ("state_mean", "state_std", "rtg_scale")}
            like.update(context_len=args.context or ckpt["eval_context_len"], eval_rtg=rtg)
            score = normalized(pt.evaluate(model, envs, like, seeds, "cpu"), ckpt)
            row.append(f"target {rtg:g}: {score.mean():.2f} +- {score.std(ddof=1) / np.sqrt(len(score)):.2f}")
        print(f"{path} (context {args.context or ckpt['eval_context_len']}): " + " | ".join(row), flush=True)
        for env in envs:
            env.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
