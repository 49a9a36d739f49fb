"""Benchmark of grpo_dt_qguided.py on local/hopper/medium-v0 at CPU size, optionally next to grpo_dt.py.

Prints the normalized score per iteration (with env steps, Q values, critic loss, kept fraction, clip fraction
and KL) read back from TensorBoard. With --with-grpo-dt, reset-based GRPO-DT runs on the same checkpoint
with the same --total-env-steps budget, and both curves are printed against env steps. Not a test.

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/bench_grpo_dt_qguided.py \
        --total-env-steps 20000 --max-seconds 600 --with-grpo-dt
"""

import glob
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    checkpoint: str = "/tmp/qg/hopper_cpu_1k.pt"
    """pretrained checkpoint; made with --pretrain-args when missing"""
    pretrain_args: str = (
        "--embed-dim 64 --n-layers 2 --n-heads 2 --num-updates 1000 --batch-size 64 "
        "--warmup-updates 100 --eval-every 0 --save-every 0 --eval-episodes 5"
    )
    """pretrain_dt.py flags for a CPU-sized checkpoint"""
    out_dir: str = "/tmp/qg/bench"
    """TensorBoard runs and logs go here"""
    total_env_steps: int = 20000
    """training env-step budget given to every script"""
    max_seconds: float = 600
    """wall-clock budget of each run"""
    eval_episodes: int = 5
    """deterministic evaluation episodes per iteration"""
    qguided_args: str = "--critic-warmup-updates 1200 --torch-threads 1"
    """extra grpo_dt_qguided.py flags"""
    with_grpo_dt: bool = False
    """also run reset-based grpo_dt.py (if it exists) at the same env-step budget, in parallel"""
    grpo_dt_args: str = "--eval-len 50 --trajs-per-iter 4 --reset-points 2 --torch-threads 1"
    """extra grpo_dt.py flags (the paper's L_eval 400 x 512 sub-trajectories is ~200k steps per iteration)"""


def scalars(run_dir):
    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


TASK = ("--env-id", "Hopper-v4", "--dataset", "local/hopper/medium-v0")  # the one task this benchmark runs


def launch(script, name, args, extra):
    runs = Path(args.out_dir) / name
    cmd = [
        sys.executable,
        str(ROOT / script),
        *TASK,
        "--checkpoint",
        args.checkpoint,
        "--num-iterations",
        "100000",
        "--total-env-steps",
        str(args.total_env_steps),
        "--max-seconds",
        str(args.max_seconds),
        "--eval-episodes",
        str(args.eval_episodes),
        "--runs-dir",
        str(runs),
        *shlex.split(extra),
    ]
    print("$", shlex.join(cmd), flush=True)
    log = open(Path(args.out_dir) / f"{name}.log", "w")
    return runs, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def report(name, runs):
    (run,) = glob.glob(f"{runs}/*/")
    s = scalars(run)
    cols = [
        c
        for c in (
            "losses/q_values",
            "losses/critic_loss",
            "losses/kept_fraction",
            "losses/clipfrac",
            "losses/kl",
            "losses/entropy",
        )
        if c in s
    ]
    print(f"\n{name}: iteration, env_steps, normalized_score, " + ", ".join(c.split("/")[1] for c in cols))
    for it in sorted(s["charts/normalized_score"]):
        extra = [f"{s[c][it]:.4g}" if it in s[c] else "-" for c in cols]
        print(
            f"  {it:4d} {int(s['charts/env_steps'].get(it, 0)):8d} {s['charts/normalized_score'][it]:7.2f}  " + " ".join(extra)
        )
    return s


def main(args: Args):
    os.environ.setdefault("MINARI_DATASETS_PATH", str((ROOT / ".." / "shared" / "datasets").resolve()))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if not Path(args.checkpoint).is_file():
        t0 = time.time()
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "pretrain_dt.py"),
                *TASK,
                "--checkpoint",
                args.checkpoint,
                "--runs-dir",
                f"{args.out_dir}/pretrain",
                *shlex.split(args.pretrain_args),
            ],
            check=True,
        )
        print(f"pretraining took {time.time() - t0:.0f} s")
    t0 = time.time()
    jobs = {"grpo_dt_qguided": launch("grpo_dt_qguided.py", "grpo_dt_qguided", args, args.qguided_args)}
    if args.with_grpo_dt and (ROOT / "grpo_dt.py").is_file():
        jobs["grpo_dt"] = launch("grpo_dt.py", "grpo_dt", args, args.grpo_dt_args)
    elif args.with_grpo_dt:
        print("grpo_dt.py not found: reporting grpo_dt_qguided.py alone")
    for name, (runs, proc) in jobs.items():
        print(f"{name}: exit {proc.wait()} after {time.time() - t0:.0f} s")
    results = {name: report(name, runs) for name, (runs, _) in jobs.items()}
    if len(results) == 2:
        print(
            "\nfinal (last iteration): "
            + "; ".join(
                f"{n}: score {s['charts/normalized_score'][max(s['charts/normalized_score'])]:.2f} at "
                f"{int(s['charts/env_steps'][max(s['charts/env_steps'])])} env steps"
                for n, s in results.items()
            )
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
