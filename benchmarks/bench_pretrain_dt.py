"""Pretraining benchmark: updates/s and peak memory for the paper's 4x512 DT and a CPU-sized DT, and the
normalized score the CPU-sized DT reaches on local/hopper/medium-v0 (target: the dataset's own 40.3).

Prints figures; it is not a test. Each configuration runs `pretrain_dt.py` in its own process, so the peak
resident memory reported (from `os.wait4`) is that run's alone; on CUDA the script's peak GPU memory is
not measured here.

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/bench_pretrain_dt.py
    python benchmarks/bench_pretrain_dt.py --learn-updates 0   # speed only
"""

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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
    learn_updates: int = 5000
    """updates of the CPU-sized learning run (0 skips it)"""
    cpu_model: str = "--embed-dim 128 --n-layers 3 --n-heads 4 --batch-size 64"
    """flags of the CPU-sized configuration"""
    eval_episodes: int = 10
    """evaluation episodes of the learning run"""


def run(flags: list[str], tmp: Path, name: str):
    """Run pretrain_dt.py; return (wall s, peak RSS MiB, scalars dict)."""
    cmd = [sys.executable, str(ROOT / "pretrain_dt.py"), "--checkpoint", str(tmp / f"{name}.pt"),
           "--runs-dir", str(tmp / name), "--save-every", "0", *flags]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    if status != 0:
        sys.exit(f"{name} failed:\n{out[-2000:]}")
    acc = EventAccumulator(str(next((tmp / name).iterdir())))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return wall, usage.ru_maxrss / 1024, scalars


def main(args: Args):
    base = ["--env-id", args.env_id, "--dataset", args.dataset]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"{'config':<10} {'updates/s':>10} {'peak RSS MiB':>13}")
        for name, model in (("paper4x512", "--batch-size 256"), ("cpu", args.cpu_model)):
            flags = [*base, *model.split(), "--num-updates", str(args.speed_updates), "--eval-every", "0",
                     "--eval-episodes", "1", "--warmup-updates", "1"]
            _, rss, scalars = run(flags, tmp, name)
            ups = scalars["charts/updates_per_s"][-1][1]
            print(f"{name:<10} {ups:>10.2f} {rss:>13.0f}", flush=True)
        if args.learn_updates:
            flags = [*base, *args.cpu_model.split(), "--num-updates", str(args.learn_updates),
                     "--eval-every", str(max(1, args.learn_updates // 5)), "--eval-episodes", str(args.eval_episodes)]
            wall, _, scalars = run(flags, tmp, "learn")
            print(f"\nCPU-sized DT, {args.learn_updates} updates ({args.cpu_model}) in {wall / 60:.1f} min:")
            for step, score in scalars["charts/normalized_score"]:
                print(f"  update {step:>6}: normalized score {score:6.1f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
