"""Benchmark of odt_td3.py (issue 5, section 6): ODT and ODT+TD3 on local/hopper/medium-v0 at CPU size.

Pretrains a CPU-sized DT once (the sizes of benchmarks/compare.py --scale cpu), then finetunes it with both modes on
the same env-step budget, the two runs in parallel with one thread each, and prints the normalized score per
iteration against the pretrained score, plus env steps/s and gradient updates/s. It prints figures; it is not a test.

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/bench_odt_td3.py --budget-env-steps 20000
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = [
    "--embed-dim",
    "64",
    "--n-layers",
    "2",
    "--n-heads",
    "2",
    "--num-updates",
    "1000",
    "--batch-size",
    "64",
    "--warmup-updates",
    "100",
    "--eval-episodes",
    "5",
    "--eval-every",
    "0",
    "--save-every",
    "0",
]


@dataclass
class Args:
    out_dir: str = "results/bench_odt_td3/raw"
    """where the checkpoint, TensorBoard runs and logs go"""
    seed: int = 1
    """seed of pretraining and of both finetuning runs"""
    budget_env_steps: int = 20000
    """training env steps per mode (--total-env-steps)"""
    max_seconds: float = 600
    """wall-clock cap per mode (--max-seconds)"""
    actor_updates: int = 60
    """DT updates per iteration (the script's default: 300)"""
    critic_updates: int = 120
    """critic updates per iteration (the script's MuJoCo default: 600)"""
    n_batch: int = 64
    """segments per update (the script's default: 256)"""
    critic_pretrain_updates: int = 1000
    """critic updates on the offline data before the online phase (the script's default: 5000)"""
    eval_episodes: int = 5
    """deterministic evaluation episodes per iteration"""
    warmup_updates: int = 200
    """DT lr warm-up (the script's default 1000 at 300 updates per iteration; scaled with the update count)"""


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir)).Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def main(args: Args):
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.setdefault("MINARI_DATASETS_PATH", str((ROOT / ".." / "shared" / "datasets").resolve()))
    ckpt = out / f"Hopper-v4__local-hopper-medium-v0__cpu__s{args.seed}.pt"
    if not ckpt.exists():
        t0 = time.time()
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "pretrain_dt.py"),
                "--env-id",
                "Hopper-v4",
                "--dataset",
                "local/hopper/medium-v0",
                "--seed",
                str(args.seed),
                "--checkpoint",
                str(ckpt),
                "--runs-dir",
                str(out / "runs"),
                *PRETRAIN,
            ],
            env=env,
            check=True,
        )
        print(f"pretraining: {time.time() - t0:.0f}s")
    procs, t0 = {}, time.time()
    for algo in ("odt", "odt_td3"):
        cmd = [
            sys.executable,
            str(ROOT / "odt_td3.py"),
            "--env-id",
            "Hopper-v4",
            "--dataset",
            "local/hopper/medium-v0",
            "--checkpoint",
            str(ckpt),
            "--algo",
            algo,
            "--seed",
            str(args.seed),
            "--num-iterations",
            "100000",
            "--total-env-steps",
            str(args.budget_env_steps),
            "--max-seconds",
            str(args.max_seconds),
            "--actor-updates",
            str(args.actor_updates),
            "--critic-updates",
            str(args.critic_updates),
            "--n-batch",
            str(args.n_batch),
            "--warmup-updates",
            str(args.warmup_updates),
            "--critic-pretrain-updates",
            str(args.critic_pretrain_updates),
            "--eval-episodes",
            str(args.eval_episodes),
            "--runs-dir",
            str(out / "runs" / algo),
            "--exp-name",
            f"bench_{algo}",
        ]
        print(" ".join(cmd))
        procs[algo] = subprocess.Popen(cmd, env=env, stdout=open(out / f"{algo}.log", "w"), stderr=subprocess.STDOUT)
    for algo, p in procs.items():
        if p.wait() != 0:
            sys.exit(f"error: {algo} failed (exit {p.returncode}); see {out / f'{algo}.log'}")
    print(f"finetuning (both modes in parallel): {time.time() - t0:.0f}s\n")

    runs = {algo: scalars(max((out / "runs" / algo).iterdir(), key=lambda p: p.stat().st_mtime)) for algo in procs}
    its = sorted(set().union(*(r["charts/normalized_score"] for r in runs.values())))
    print("| iteration | " + " | ".join(f"{a} score | {a} env steps" for a in runs) + " |")
    print("|---" * (1 + 2 * len(runs)) + "|")
    for it in its:
        cells = [
            f"{r['charts/normalized_score'].get(it, float('nan')):.1f} | {int(r.get('charts/env_steps', {}).get(it, 0))}"
            for r in runs.values()
        ]
        print(f"| {it} | " + " | ".join(cells) + " |")
    print(f"\npretrained checkpoint (iteration 0): {runs['odt']['charts/normalized_score'][0]:.1f}")
    for algo, r in runs.items():
        last = max(r["charts/normalized_score"])
        scores = np.array(list(r["charts/normalized_score"].values()))
        print(
            f"{algo}: {last} iterations, final {scores[-1]:.1f}, best {scores.max():.1f}, "
            f"mean of last 5 {scores[-5:].mean():.1f}, env steps {int(r['charts/env_steps'][last])}, "
            f"SPS {r['charts/SPS'][last]:.1f}, updates/s {np.mean(list(r['charts/updates_per_s'].values())):.1f}"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
