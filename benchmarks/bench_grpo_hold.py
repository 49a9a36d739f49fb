"""Does GRPO-DT hold its gains? Arms x seeds of `grpo_dt.py` from one fixed pretrained checkpoint, side by side.

Each run is a `grpo_dt.py` subprocess (one torch thread, `--parallel` at a time) whose per-iteration normalized score is
read back from its TensorBoard log. Prints per arm and seed (start, peak, mean of the last 5 evaluations) and the means
over seeds, and writes `results/<name>/summary.md` (with every run's command) and `results/<name>/curves.png`.
The issue's target for the default arm: the mean over seeds of the last-5 mean is at least start + 20 points, and no
seed's last-5 mean is below its own start. Prints figures; it is not a test.

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/bench_grpo_hold.py --checkpoint CKPT \
        --arm "as-today=" --arm "updates-2=--updates-per-iter 2" --seeds 3 --iterations 40
"""

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    checkpoint: str
    """the fixed pretrained checkpoint every arm starts from (an arm may override it with its own --checkpoint)"""
    arm: list[str] = field(default_factory=lambda: ["as-today="])
    """arms as NAME=FLAGS (grpo_dt.py flags), repeatable"""
    env_id: str = "Hopper-v4"
    """gymnasium env id"""
    dataset: str = "local/hopper/medium-v0"
    """dataset id (picks the Table 6 row)"""
    seeds: int = 3
    """seeds 1..seeds per arm"""
    iterations: int = 40
    """GRPO-DT iterations per run"""
    eval_episodes: int = 20
    """evaluation episodes per iteration"""
    parallel: int = 2
    """runs at a time"""
    name: str = "grpo-hold-hopper"
    """results go to results/<name>; raw logs to results/<name>/raw (git-ignored)"""


def scores_of(runs_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, normalized scores) of the single run under `runs_dir`."""
    (run,) = list(runs_dir.iterdir())
    acc = EventAccumulator(str(run))
    acc.Reload()
    events = acc.Scalars("charts/normalized_score")
    return np.array([e.step for e in events]), np.array([e.value for e in events])


def main(args: Args):
    out = ROOT / "results" / args.name
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    bad = [a for a in args.arm if "=" not in a]
    if bad:
        sys.exit(f"error: --arm takes NAME=FLAGS (e.g. 'updates-2=--updates-per-iter 2'); got {bad}")
    arms = dict(a.split("=", 1) for a in args.arm)
    runs = []
    for arm, flags in arms.items():
        for seed in range(1, args.seeds + 1):
            cmd = [
                sys.executable,
                "grpo_dt.py",
                "--env-id",
                args.env_id,
                "--dataset",
                args.dataset,
                "--checkpoint",
                args.checkpoint,
                "--seed",
                str(seed),
                "--num-iterations",
                str(args.iterations),
                "--eval-episodes",
                str(args.eval_episodes),
                "--runs-dir",
                str(raw / arm / f"s{seed}"),
                *shlex.split(flags),
            ]
            runs.append((arm, seed, cmd))
    pending, running = list(runs), []
    while pending or running:
        while pending and len(running) < args.parallel:
            arm, seed, cmd = pending.pop(0)
            if (raw / arm / f"s{seed}.done").exists():
                continue
            log = open(raw / f"{arm}_s{seed}.log", "w")
            running.append((arm, seed, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)))
        if running:
            arm, seed, proc = running.pop(0)
            if proc.wait() != 0:
                sys.exit(f"error: {arm} seed {seed} failed, see {raw / f'{arm}_s{seed}.log'}")
            (raw / arm / f"s{seed}.done").touch()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        f"# {args.name}: does GRPO-DT hold its gains?",
        "",
        f"- env {args.env_id}, dataset {args.dataset}, {args.iterations} iterations, seeds 1..{args.seeds}, "
        f"{args.eval_episodes} evaluation episodes per point",
        f"- fixed checkpoint: `{args.checkpoint}`",
        "- per seed: start (iteration 0) / peak / mean of the last 5 evaluations",
        "",
        "| arm | flags | start | peak | last-5 mean | last-5 minus start | per seed (start / peak / last 5) |",
        "|---|---|---|---|---|---|---|",
    ]
    fig, ax = plt.subplots(figsize=(8, 5))
    for k, (arm, flags) in enumerate(arms.items()):
        per_seed = []
        for seed in range(1, args.seeds + 1):
            it, sc = scores_of(raw / arm / f"s{seed}")
            per_seed.append((sc[0], sc.max(), sc[-5:].mean()))
            ax.plot(it, sc, color=f"C{k}", alpha=0.35)
        ps = np.array(per_seed)
        curves = np.array([scores_of(raw / arm / f"s{s}")[1] for s in range(1, args.seeds + 1)])
        ax.plot(np.arange(curves.shape[1]), curves.mean(0), color=f"C{k}", label=f"{arm} (mean of {args.seeds})")
        seeds_txt = "; ".join(f"{a:.1f} / {b:.1f} / {c:.1f}" for a, b, c in ps)
        lines.append(
            f"| {arm} | `{flags or '(none)'}` | {ps[:, 0].mean():.1f} | {ps[:, 1].mean():.1f} | "
            f"{ps[:, 2].mean():.1f} ± {ps[:, 2].std():.1f} | {(ps[:, 2] - ps[:, 0]).mean():+.1f} | {seeds_txt} |"
        )
        print(lines[-1], flush=True)
    lines += ["", "Commands:", ""] + [f"- `{shlex.join(cmd[1:])}`" for _, _, cmd in runs]
    ax.set_xlabel("iteration")
    ax.set_ylabel("normalized score")
    ax.legend()
    fig.savefig(out / "curves.png", dpi=100, bbox_inches="tight")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'summary.md'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main(tyro.cli(Args))
