"""IQL benchmark: the normalized score offline IQL reaches on local/hopper/medium-v0 over several seeds (target: the
dataset's own 40.3), at the paper-matched 5000 offline updates and at a larger budget, and optionally the score
after online finetuning for a given env-step budget.

Prints figures; it is not a test. Each run is `iql.py` in its own process, one at a time, with one torch thread,
on a snapshot of iql.py taken at the start (its sha1 is printed), so editing the script mid-benchmark changes
nothing. Per run: the score after offline training (mean over --eval-episodes deterministic episodes, with its
standard error over episodes), the offline updates/s, and the score curve at every --offline-eval-every updates.
Each run's output goes to `--out-dir/<run>.log`; the snapshot and the TensorBoard folders to a temporary folder.

    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/bench_iql.py
    python benchmarks/bench_iql.py --budgets 5000 --online-steps 20000   # also online finetuning
    python benchmarks/bench_iql.py --budgets 100000 --seeds 1 2 & python benchmarks/bench_iql.py --budgets 100000 --seeds 3
    python benchmarks/bench_iql.py --budgets 100000 --report-only          # summarise seeds 1-3 from their .json
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    env_id: str = "Hopper-v4"
    """gymnasium env id"""
    dataset: str = "local/hopper/medium-v0"
    """Minari id of the offline data"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """run seeds per budget, one at a time (start two benchmarks with different seeds to use two cores)"""
    budgets: tuple[int, ...] = (5000, 30000)
    """offline-update budgets; each is its own run (the actor's cosine schedule spans the run's own budget)"""
    offline_eval_every: int = 5000
    """evaluations during offline training, for the curve"""
    eval_episodes: int = 20
    """deterministic evaluation episodes per evaluation"""
    online_steps: int = 0
    """online finetuning env steps after the offline updates (0: offline only)"""
    eval_every: int = 5000
    """online evaluation interval in env steps"""
    extra: str = ""
    """extra iql.py flags, one shell string"""
    out_dir: str = str(ROOT / "benchmarks" / "iql_out")
    """where the per-run logs and results (`<run>.log`, `<run>.json`) go"""
    report_only: bool = False
    """run nothing; summarise the `<run>.json` results already in --out-dir for these budgets, seeds, online steps"""


def scalars(run_dir: Path) -> dict:
    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def main(args: Args):
    out, tmp = Path(args.out_dir), Path(tempfile.mkdtemp(prefix="bench_iql_"))
    out.mkdir(parents=True, exist_ok=True)
    snapshot = tmp / "iql.py"
    shutil.copy(ROOT / "iql.py", snapshot)
    sha = hashlib.sha1(snapshot.read_bytes()).hexdigest()[:10]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MINARI_DATASETS_PATH": os.environ.get("MINARI_DATASETS_PATH", str(ROOT.parent / "shared" / "datasets")),
    }
    if not args.report_only:
        print(f"iql.py sha1 {sha}; {args.env_id} on {args.dataset}; {args.eval_episodes} eval episodes", flush=True)
    results = {}
    for budget in args.budgets:
        for seed in args.seeds:
            name = f"offline{budget}_online{args.online_steps}_s{seed}"
            if args.report_only:
                if not (out / f"{name}.json").is_file():
                    sys.exit(f"error: no result {out / f'{name}.json'}; run it first (without --report-only)")
                results[budget, seed] = json.loads((out / f"{name}.json").read_text())
                continue
            runs = tmp / "runs" / name
            cmd = [
                sys.executable,
                str(snapshot),
                "--env-id",
                args.env_id,
                "--dataset",
                args.dataset,
                "--seed",
                str(seed),
                "--offline-updates",
                str(budget),
                "--offline-eval-every",
                str(args.offline_eval_every),
                "--online-steps",
                str(args.online_steps),
                "--eval-every",
                str(args.eval_every),
                "--eval-episodes",
                str(args.eval_episodes),
                "--runs-dir",
                str(runs),
                "--save-every",
                "0",
                *args.extra.split(),
            ]
            start = time.time()
            with open(out / f"{name}.log", "w") as log:
                log.write(f"# {' '.join(cmd)}\n# iql.py sha1 {sha}\n")
                log.flush()
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            if code != 0:
                sys.exit(f"{name} failed (exit {code}); see {out / f'{name}.log'}")
            s = scalars(next(runs.iterdir()))
            final_step = max(s["charts/normalized_score"])
            results[budget, seed] = dict(
                offline=s["charts/normalized_score"][0],
                offline_sem=s["charts/normalized_score_sem"][0],
                online=s["charts/normalized_score"][final_step],
                online_sem=s["charts/normalized_score_sem"][final_step],
                ups=s["offline/updates_per_s"][budget],
                curve={str(k): v for k, v in s["offline/normalized_score"].items()},
                wall=time.time() - start,
                command=" ".join(cmd),
            )
            r = results[budget, seed]
            (out / f"{name}.json").write_text(json.dumps(r, indent=1))
            print(
                f"{budget:>7} offline updates, seed {seed}: score {r['offline']:.2f} +- {r['offline_sem']:.2f} (sem, "
                f"{args.eval_episodes} episodes), {r['ups']:.1f} updates/s, {r['wall']:.0f} s"
                + (
                    f"; after {final_step} online steps {r['online']:.2f} +- {r['online_sem']:.2f}"
                    if args.online_steps
                    else ""
                ),
                flush=True,
            )

    print(
        f"\nsummary (seeds {', '.join(map(str, args.seeds))}; +- over seeds is np.std, ddof=0; sem: mean over seeds of "
        "each run's standard error over its evaluation episodes):"
    )
    for budget in args.budgets:
        rows = [results[budget, s] for s in args.seeds]
        for key in ("offline", "online") if args.online_steps else ("offline",):
            x = np.array([r[key] for r in rows])
            sem = np.mean([r[f"{key}_sem"] for r in rows])
            label = f"after {budget} offline updates" + (f" + {args.online_steps} online steps" if key == "online" else "")
            print(
                f"  {label}: {x.mean():.2f} +- {x.std():.2f} (per seed {', '.join(f'{v:.2f}' for v in x)}; "
                f"eval sem {sem:.2f}); target 40.3"
            )
        steps = sorted(rows[0]["curve"], key=int)
        if len(steps) > 1:
            curve = np.array([[r["curve"][k] for k in steps] for r in rows])
            print("  curve: " + ", ".join(f"{k}: {m:.1f}" for k, m in zip(steps, curve.mean(0))))
        print(f"  updates/s (1 thread, shared machine): {np.mean([r['ups'] for r in rows]):.1f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main(tyro.cli(Args))
