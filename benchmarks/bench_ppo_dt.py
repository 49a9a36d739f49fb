"""Benchmark of ppo_dt.py on local/hopper/medium-v0 at CPU size: normalized score per iteration against the
pretrained score, and SPS. It prints figures; it is never a timed test.

Steps: (1) pretrain a CPU-sized DT with pretrain_dt.py unless its checkpoint exists, (2) run ppo_dt.py with the
Table 7 Hopper row (K_PPO 8, n_batch 256, c_online 1, g_online 7200, ...) under a wall-clock budget, (3) read
the run's TensorBoard scalars and print one row per iteration (also written to
`{out_dir}/raw/table_{size}.md`).

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) nohup python benchmarks/bench_ppo_dt.py > bench.log 2>&1 &
"""

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    out_dir: str = "results/bench_ppo_dt"
    """checkpoint, TensorBoard runs and the table go to `{out_dir}/raw`"""
    env_id: str = "Hopper-v4"
    """gymnasium id"""
    dataset: str = "local/hopper/medium-v0"
    """Minari id of the pretraining data"""
    seed: int = 1
    """seed of pretraining and finetuning"""
    embed_dim: int = 64
    """CPU-sized DT width (paper: 512)"""
    n_layers: int = 2
    """CPU-sized DT depth (paper: 4)"""
    pretrain_updates: int = 2000
    """pretraining updates (paper/ODT: 5000 at width 512)"""
    pretrain_learning_rate: float = 1e-3
    """pretraining LAMB learning rate (paper: 1e-4 with batch 256; a small model on a CPU budget needs more)"""
    pretrain_batch_size: int = 64
    """pretraining batch (paper: 256)"""
    num_iterations: int = 1000
    """PPO-DT iterations; the wall-clock budget normally ends the run first"""
    max_seconds: float = 720
    """wall-clock budget of the finetuning run"""
    eval_episodes: int = 5
    """deterministic evaluation episodes per iteration"""
    torch_threads: int = 1
    """torch CPU threads for both runs (1 is fastest for small models on a shared CPU)"""
    ppo_extra_args: str = ""
    """extra ppo_dt.py flags, e.g. "--relabel" to measure the failure mode"""
    tag: str = ""
    """suffix of the run folder and table name, to keep variants (e.g. relabel) apart"""


def main(args: Args):
    raw = ROOT / args.out_dir / "raw"
    size = f"cpu{args.embed_dim}x{args.n_layers}_u{args.pretrain_updates}_lr{args.pretrain_learning_rate:g}"
    ckpt = raw / f"{args.env_id}__{args.dataset.replace('/', '-')}__{size}__s{args.seed}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.torch_threads)}
    task = ["--env-id", args.env_id, "--dataset", args.dataset, "--seed", str(args.seed), "--checkpoint", str(ckpt)]
    if not ckpt.exists():
        cmd = [
            sys.executable,
            str(ROOT / "pretrain_dt.py"),
            *task,
            "--embed-dim",
            str(args.embed_dim),
            "--n-layers",
            str(args.n_layers),
            "--num-updates",
            str(args.pretrain_updates),
            "--batch-size",
            str(args.pretrain_batch_size),
            "--warmup-updates",
            str(args.pretrain_updates // 10),
            "--learning-rate",
            str(args.pretrain_learning_rate),
            "--eval-every",
            "0",
            "--eval-episodes",
            str(args.eval_episodes),
            "--runs-dir",
            str(raw / "runs"),
        ]
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
    runs = raw / f"runs_ppo_{size}{args.tag}"
    before = set(runs.iterdir()) if runs.exists() else set()
    cmd = [
        sys.executable,
        str(ROOT / "ppo_dt.py"),
        *task,
        "--num-iterations",
        str(args.num_iterations),
        "--max-seconds",
        str(args.max_seconds),
        "--eval-episodes",
        str(args.eval_episodes),
        "--torch-threads",
        str(args.torch_threads),
        "--runs-dir",
        str(runs),
    ] + shlex.split(args.ppo_extra_args)
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)

    (run,) = set(runs.iterdir()) - before
    acc = EventAccumulator(str(run)).Reload()
    s = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    import torch  # only for the pretrained score stored in the checkpoint

    meta = torch.load(ckpt, map_location="cpu", weights_only=False)
    pretrained, c_offline = meta["eval_normalized_score"], meta["model_config"]["c_offline"]
    cols = [
        "charts/normalized_score",
        "charts/eval_return",
        "charts/episodic_return",
        "charts/env_steps",
        "charts/SPS",
        "losses/approx_kl",
        "losses/clipfrac",
        "losses/entropy",
        "losses/kappa",
        "losses/explained_variance",
    ]
    lines = [
        f"pretrained checkpoint score (context {c_offline}, pretrain_dt.py eval): {pretrained:.1f}",
        f"run: {run}",
        "",
        "| iteration | " + " | ".join(c.split("/")[1] for c in cols) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]
    for it in sorted(s["charts/normalized_score"]):
        lines.append(f"| {it} | " + " | ".join(f"{s[c][it]:.4g}" if it in s.get(c, {}) else "" for c in cols) + " |")
    scores = s["charts/normalized_score"]
    last = sorted(scores)[-5:]
    lines += [
        "",
        f"iteration 0 (before any update): {scores[0]:.1f}; best: {max(scores.values()):.1f}; "
        f"mean of last {len(last)}: {sum(scores[i] for i in last) / len(last):.1f}",
    ]
    text = "\n".join(lines)
    print(text)
    (raw / f"table_{size}{args.tag}.md").write_text(text + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
