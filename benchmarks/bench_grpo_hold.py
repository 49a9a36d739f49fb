"""Does GRPO-DT hold its gains? Arms x seeds of `grpo_dt.py` from one fixed pretrained checkpoint, side by side.

Each run is a `grpo_dt.py` subprocess (`grpo_dt_fast.py`, the same algorithm, for an arm that uses its worker flags;
OMP_NUM_THREADS=1, `--parallel` at a time) whose per-iteration normalized score is read back from its TensorBoard
log. Every run gets `--scale` (default cpu: grpo_dt.py then explores narrowly, `--narrow-exploration`, as the
committed hold results' `default` arms did, and on MuJoCo scores sub-trajectories at gamma 1, where the hold results
other than grpo-keeps-peak's `gamma1` ran at Table 6's 0.995: an arm's `--gamma 0.995` re-runs those; `--scale
paper` is the paper's sigma, epsilon and gamma). Prints per arm and seed (start, peak, mean of the last 5
evaluations) and the means over seeds, and writes `results/<name>/summary.md` (with every run's command and the
commit it ran at) and `results/<name>/curves.png`. The hold target, printed for every arm: the mean over seeds of
the last-5 mean is at least start + `--target-gain` (20 on Hopper), and no seed's last-5 mean is more than
`--target-floor` below its own start (0 on Hopper; Door: 20 iterations, gain -2, floor 2). Prints figures; it is not
a test.

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/bench_grpo_hold.py --checkpoint CKPT \
        --arm "default=" "paper=--no-narrow-exploration" --seeds 1 2 3 --iterations 40

A finished run writes its command into `raw/<arm>/s<seed>.done` and is not run again; a killed one goes on from its
last saved state (`--resume`) when the benchmark is started again. Each finished run's command and curve are also kept
in `results/<name>/records/<arm>/s<seed>.json`, which is committed: `raw/` is git-ignored and is lost with the machine,
the records are not. `--report-only` runs nothing and reports every arm and seed that has a record (or a finished run
under `raw/`), each with the command it recorded (arms may then differ in their seeds; an arm's own `--checkpoint` in
its flags wins).
"""

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import tyro
from compare import git_commit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
# grpo_dt_fast.py's own flags (workers, pipeline, CUDA graphs, update chunks): an arm that sets one runs that script
FAST_FLAGS = ("--num-workers", "--pipeline-stages", "--cuda-graphs", "--no-cuda-graphs", "--update-chunk-steps")


@dataclass
class Args:
    checkpoint: str = ""
    """the fixed pretrained checkpoint every arm starts from (an arm may override it with its own --checkpoint)"""
    arm: list[str] = field(default_factory=lambda: ["default="])
    """arms as NAME=FLAGS (grpo_dt.py flags), all after one --arm: `--arm "a=" "b=--std-scale 0.5"` (a second --arm
    replaces the first)"""
    env_id: str = "Hopper-v4"
    """gymnasium env id"""
    dataset: str = "local/hopper/medium-v0"
    """dataset id (picks the Table 6 row)"""
    scale: Literal["cpu", "paper"] = "cpu"
    """grpo_dt.py's --scale for every run: cpu explores narrowly (--narrow-exploration), paper at the paper's values"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """run seeds of every arm"""
    iterations: int = 40
    """GRPO-DT iterations per run"""
    eval_episodes: int = 20
    """evaluation episodes per iteration"""
    parallel: int = 2
    """runs at a time"""
    name: str = "grpo-hold-hopper"
    """results go to results/<name>; raw logs to results/<name>/raw (git-ignored)"""
    report_only: bool = False
    """run nothing; report every arm and seed found under results/<name>/raw"""
    target_gain: float = 20.0
    """the hold target: the mean over seeds of (last-5 mean - start) is at least this (Hopper 20; Door: -2)"""
    target_floor: float = 0.0
    """the hold target: no seed's last-5 mean is more than this below its own start (Hopper 0, Door 2)"""
    plot_arms: tuple[str, ...] = ()
    """the arms drawn in curves.png (all in summary.md); default all"""


def scores_of(runs_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, normalized scores) of the single TensorBoard run under `runs_dir`."""
    (run,) = [d for d in runs_dir.iterdir() if d.is_dir()]
    acc = EventAccumulator(str(run))
    acc.Reload()
    by_step = {e.step: e.value for e in acc.Scalars("charts/normalized_score")}  # a resumed run re-logs from its state
    steps = sorted(by_step)
    return np.array(steps), np.array([by_step[k] for k in steps])


def record_path(out: Path, arm: str, seed: int) -> Path:
    return out / "records" / arm / f"s{seed}.json"


def write_record(out: Path, arm: str, seed: int, command: str, commit: str = ""):
    """Keep a finished run's command, the commit it ran at (when known) and its curve where git sees them (`raw/` is
    ignored and dies with the machine)."""
    iterations, scores = scores_of(out / "raw" / arm / f"s{seed}")
    record = {"command": command, "iterations": iterations.tolist(), "scores": [round(float(x), 4) for x in scores]}
    record.update({"commit": commit} if commit else {})
    record_path(out, arm, seed).parent.mkdir(parents=True, exist_ok=True)
    record_path(out, arm, seed).write_text(json.dumps(record) + "\n")


def load_record(out: Path, arm: str, seed: int, cmd: list[str]) -> dict:
    """A run's record; a run finished before records existed gets one from its marker and TensorBoard log."""
    if not record_path(out, arm, seed).exists():
        write_record(out, arm, seed, recorded(out / "raw", arm, seed, cmd))
    return json.loads(record_path(out, arm, seed).read_text())


def run_command(args: Args, raw: Path, arm: str, flags: str, seed: int) -> list[str]:
    """One run's command: grpo_dt.py (grpo_dt_fast.py where the arm sets a FAST_FLAGS flag), the arm's flags last."""
    arm_flags = shlex.split(flags)
    script = "grpo_dt_fast.py" if any(f.split("=")[0] in FAST_FLAGS for f in arm_flags) else "grpo_dt.py"
    checkpoint = [] if "--checkpoint" in flags else ["--checkpoint", args.checkpoint]
    command = [sys.executable, script, "--env-id", args.env_id, "--dataset", args.dataset, *checkpoint]
    command += ["--seed", str(seed), "--scale", args.scale, "--num-iterations", str(args.iterations)]
    command += ["--eval-episodes", str(args.eval_episodes)]
    return command + ["--runs-dir", str(raw / arm / f"s{seed}"), *arm_flags]


def shown(cmd: list[str]) -> str:
    """A run's command as a user types it from the repository root (python, relative paths)."""
    return shlex.join(["python", *cmd[1:]]).replace(f"{ROOT}/", "")


def recorded(raw: Path, arm: str, seed: int, cmd: list[str]) -> str:
    """The command a finished run recorded in its `.done` marker; runs from before markers held it are rebuilt from
    this invocation's flags (right only if they are the flags it ran with)."""
    done = raw / arm / f"s{seed}.done"
    text = done.read_text().strip() if done.exists() else ""
    return text or shown(cmd) + "  # (not recorded: rebuilt from this invocation's --arm)"


def run_all(args: Args, raw: Path, runs: list[tuple[str, int, list[str]]]):
    """Run what has no `.done` marker, `--parallel` at a time; a failed run stops the benchmark with its log's path.
    A run that was killed goes on from its last saved state (`--resume`, grpo_dt.py saves every 5 iterations)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = [r for r in runs if not (raw / r[0] / f"s{r[1]}.done").exists()]
    running = []
    while pending or running:
        while pending and len(running) < args.parallel:
            arm, seed, cmd = pending.pop(0)
            commit = git_commit()  # at launch, when the script is read
            (raw / arm).mkdir(parents=True, exist_ok=True)
            states = sorted((raw / arm / f"s{seed}").glob("*/state.pt"))
            log = open(raw / f"{arm}_s{seed}.log", "a" if states else "w")
            proc = subprocess.Popen(
                cmd + ["--resume", str(states[-1])] if states else cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
            )
            running.append((arm, seed, cmd, proc, commit))
        arm, seed, cmd, proc, commit = running.pop(0)
        if proc.wait() != 0:
            sys.exit(f"error: {arm} seed {seed} failed, see {raw / f'{arm}_s{seed}.log'}")
        (raw / arm / f"s{seed}.done").write_text(shown(cmd) + "\n")  # the marker records the run's command
        write_record(raw.parent, arm, seed, shown(cmd), commit)


def report(args: Args, out: Path, arms: dict[str, dict[int, list[str]]]):
    """summary.md and curves.png over the arms' seeds: per seed (start, peak, last-5 mean) and the mean over seeds;
    the curves are each arm's mean over seeds, the band its lowest and highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# {args.name}: does GRPO-DT hold its gains?", ""]
    lines += [f"- env {args.env_id}, dataset {args.dataset}, {args.eval_episodes} evaluation episodes per point"]
    lines += ["- per seed: start (iteration 0) / peak / mean of the last 5 evaluations; ± is the std over seeds", ""]
    lines += ["| arm | seeds | start | peak | last-5 mean | last-5 minus start | per seed (start / peak / last 5) |"]
    lines += ["|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(9, 5))
    targets = ["", "The hold target (last-5 mean against start, per seed):", ""]
    for k, (arm, commands) in enumerate(arms.items()):
        records = [load_record(out, arm, seed, cmd) for seed, cmd in commands.items()]
        curves = [(np.array(r["iterations"]), np.array(r["scores"])) for r in records]
        per_seed = np.array([(sc[0], sc.max(), sc[-5:].mean()) for _, sc in curves])
        if not args.plot_arms or arm in args.plot_arms:
            n = min(len(sc) for _, sc in curves)  # the mean over seeds, with a band from the lowest to the highest seed
            stacked = np.stack([sc[:n] for _, sc in curves])
            ax.plot(curves[0][0][:n], stacked.mean(0), color=f"C{k}", label=f"{arm} (mean of {len(curves)} seeds)")
            ax.fill_between(curves[0][0][:n], stacked.min(0), stacked.max(0), color=f"C{k}", alpha=0.15)
        seeds_txt = "; ".join(f"s{s}: {a:.1f} / {b:.1f} / {c:.1f}" for s, (a, b, c) in zip(commands, per_seed))
        start, peak, last5 = per_seed.T
        lines.append(
            f"| {arm} | {len(commands)} | {start.mean():.1f} | {peak.mean():.1f} | {last5.mean():.1f} ± {last5.std():.1f} | "
            f"{(last5 - start).mean():+.1f} | {seeds_txt} |"
        )
        print(lines[-1], flush=True)
        gain, worst = (last5 - start).mean(), (last5 - start).min()
        met = gain >= args.target_gain and worst >= -args.target_floor
        targets.append(
            f"- {arm}: mean gain {gain:+.1f} (target >= {args.target_gain:+.1f}), worst seed {worst:+.1f} (target >= "
            f"{0.0 - args.target_floor:+.1f}): **{'met' if met else 'not met'}**"
        )
    lines += targets
    print("\n".join(targets[3:]))
    lines += ["", "Commands (run from the repository root) and the commit each ran at:", ""]
    for arm, commands in arms.items():
        for seed, cmd in commands.items():
            record = load_record(out, arm, seed, cmd)
            lines.append(f"- `{record['command']}` at {record.get('commit') or '(commit not recorded)'}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("normalized score (deterministic evaluation)")
    ax.legend(fontsize=8)
    fig.savefig(out / "curves.png", dpi=100, bbox_inches="tight")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'summary.md'} and {out / 'curves.png'}")


def main(args: Args):
    out = ROOT / "results" / args.name
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    bad = [a for a in args.arm if "=" not in a]
    if bad:
        sys.exit(f"error: --arm takes NAME=FLAGS (e.g. 'updates-2=--updates-per-iter 2'); got {bad}")
    if not args.report_only and not args.checkpoint:
        sys.exit("error: --checkpoint is required unless --report-only")
    flags_of = dict(a.split("=", 1) for a in args.arm)
    if args.report_only:
        finished = [*raw.glob("*/s*.done"), *(out / "records").glob("*/s*.json")]
        finished = [p for p in finished if p.stem[1:].isdigit()]  # not an analysis's side file (s1_diag.json)
        seeds_of = {}
        for path in sorted(finished, key=lambda p: (p.parent.name, int(p.stem[1:]))):
            seeds_of.setdefault(path.parent.name, [])
            if int(path.stem[1:]) not in seeds_of[path.parent.name]:
                seeds_of[path.parent.name].append(int(path.stem[1:]))
    else:
        seeds_of = {arm: args.seeds for arm in flags_of}
    arms = {arm: {s: run_command(args, raw, arm, flags_of.get(arm, ""), s) for s in seeds} for arm, seeds in seeds_of.items()}
    if not args.report_only:
        run_all(args, raw, [(arm, s, cmd) for arm, commands in arms.items() for s, cmd in commands.items()])
    report(args, out, arms)


if __name__ == "__main__":
    main(tyro.cli(Args))
