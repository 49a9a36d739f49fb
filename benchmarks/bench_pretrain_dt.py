"""Pretraining benchmark: updates/s and peak memory for the paper's 4x512 DT and a CPU-sized DT, and the
normalized score a 256-wide, 3-layer DT reaches on local/hopper/medium-v0 over several seeds (target: the
dataset's own 40.3). The default learning runs take about 2.5 h on 2 cores.

Prints figures; it is not a test. Each configuration runs `pretrain_dt.py` in its own process, so the peak
resident memory reported (from `os.wait4`) is that run's alone; on CUDA the script's peak GPU memory is
not measured here. The learning runs go `--parallel` at a time with one torch thread each; scores are taken
at the default evaluation context (c_online = 1 on Hopper, what the finetuning scripts start from).

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/bench_pretrain_dt.py
    python benchmarks/bench_pretrain_dt.py --learn-updates 0   # speed only
    # the README's 3-minute CPU config (pretrain_dt.py --model-size cpu), which does not reach the target (37.6):
    python benchmarks/bench_pretrain_dt.py --learn-updates 3000 --learn-model="--model-size cpu"
"""

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    dataset: str = "local/hopper/medium-v0"
    """Minari id to pretrain on"""
    env_id: str = "Hopper-v4"
    """gymnasium env id"""
    speed_updates: int = 5
    """updates timed per configuration for updates/s"""
    speed_model: str = "--embed-dim 128 --n-layers 3 --n-heads 4 --batch-size 64"
    """flags of the CPU-sized speed configuration"""
    learn_updates: int = 4000
    """updates of each learning run (0 skips them)"""
    learn_model: str = "--embed-dim 256 --n-layers 3 --n-heads 4 --batch-size 64 --learning-rate 1e-3 --warmup-updates 300"
    """flags of the learning runs: a CPU configuration measured to reach the target (context 20, 3 seeds)"""
    seeds: int = 3
    """learning runs, seeds 1..seeds"""
    parallel: int = 2
    """learning runs at a time"""
    eval_every: int = 500
    """updates between evaluations of the learning runs"""
    eval_episodes: int = 10
    """evaluation episodes of the learning runs"""


def start(flags: list[str], tmp: Path, name: str, env=None):
    cmd = [
        sys.executable,
        str(ROOT / "pretrain_dt.py"),
        "--checkpoint",
        str(tmp / f"{name}.pt"),
        "--runs-dir",
        str(tmp / name),
        "--save-every",
        "0",
        *flags,
    ]
    # Output goes to a file, not a pipe: a parallel run must never stall on a full pipe nobody reads yet.
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def finish(proc, tmp: Path, name: str):
    """Wait for a pretrain_dt.py run; return (peak RSS MiB, scalars dict)."""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{name} failed:\n{(tmp / f'{name}.log').read_text()[-2000:]}")
    acc = EventAccumulator(str(next((tmp / name).iterdir())))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return usage.ru_maxrss / 1024, scalars


def main(args: Args):
    base = ["--env-id", args.env_id, "--dataset", args.dataset]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"{'config':<10} {'updates/s':>10} {'peak RSS MiB':>13}")
        for name, model in (("paper4x512", "--model-size paper"), ("cpu", args.speed_model)):
            flags = [
                *base,
                *model.split(),
                "--num-updates",
                str(args.speed_updates),
                "--eval-every",
                "0",
                "--eval-episodes",
                "1",
                "--warmup-updates",
                "1",
            ]
            rss, scalars = finish(start(flags, tmp, name), tmp, name)
            ups = scalars["charts/updates_per_s"][-1][1]
            print(f"{name:<10} {ups:>10.2f} {rss:>13.0f}", flush=True)
        if not args.learn_updates:
            return
        t0, scores, todo = time.time(), {}, list(range(1, args.seeds + 1))
        flags = [
            *base,
            *args.learn_model.split(),
            "--num-updates",
            str(args.learn_updates),
            "--eval-every",
            str(args.eval_every),
            "--eval-episodes",
            str(args.eval_episodes),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        while todo:
            batch, todo = todo[: args.parallel], todo[args.parallel :]
            procs = {s: start([*flags, "--seed", str(s)], tmp, f"learn{s}", env) for s in batch}
            for s, proc in procs.items():
                scores[s] = dict(finish(proc, tmp, f"learn{s}")[1]["charts/normalized_score"])
        print(
            f"\nDT ({args.learn_model}), {args.learn_updates} updates, {args.seeds} seeds, "
            f"{(time.time() - t0) / 60:.1f} min; normalized score ({args.eval_episodes} episodes per point):"
        )
        steps = sorted(scores[1])
        print(f"{'update':>7} " + " ".join(f"{'seed ' + str(s):>7}" for s in scores) + f" {'mean':>6} {'std':>5}")
        for step in steps:
            row = np.array([scores[s][step] for s in scores])
            print(f"{step:>7} " + " ".join(f"{v:>7.1f}" for v in row) + f" {row.mean():>6.1f} {row.std():>5.1f}")
        last = np.array([[scores[s][step] for step in steps[-3:]] for s in scores])
        print(
            f"mean of the last 3 evaluations over seeds: {last.mean():.1f} (per seed {last.mean(1).round(1)}); "
            f"final checkpoints: {last[:, -1].mean():.1f}; target 40.3"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
