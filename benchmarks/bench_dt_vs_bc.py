"""Is the pretrained DT ever worse than behaviour cloning? The README's CPU-sized DT next to an MLP BC, per dataset.

For each dataset and seed this runs `pretrain_dt.py` (the README's CPU config plus `--dt-flags`) and an MLP behaviour
cloning (2x256 ReLU, tanh(output) regressed on the dataset actions with MSE; `--bc-job`, this file run again) as
subprocesses, `--parallel` at a time with one torch thread each, and prints per dataset: the DT's final score and the
mean of its last 3 evaluations per seed, the same for the MLP, and the means over seeds. Target: the DT's mean over
seeds is at least the MLP's on every dataset and no DT seed's last-3 mean falls below 5. `--configs A B` prints the
recipes side by side, with the recipe targets of B against A: the range of each seed's last three evaluations and the
std of the final score over seeds at most half of A's, the mean final score at least A's and at least the MLP's mean
minus one standard error, and no degenerate final DT (on Hopper and Walker2d: every evaluation episode runs to the
time limit while the return per step is below the data's). Prints figures; it is not a test. The MLP is evaluated
exactly as `pretrain_dt.py` evaluates a DT: the same `evaluate` (deterministic, batched,
the same reset seeds), state normalisation and normalized score.

Each run's log goes to `--out-dir` (`results/dt-vs-bc/logs/`, the committed logs of the README's tables: `--report-only`
prints them again), the DTs to `--checkpoints-dir`, their TensorBoard logs under `runs/dt-vs-bc/` (both git-ignored).
The generated datasets come from `benchmarks/make_datasets.py`, which also makes the writable root this needs:
    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python benchmarks/make_datasets.py
    MINARI_DATASETS_PATH=$(realpath data/minari) python benchmarks/bench_dt_vs_bc.py
    python benchmarks/bench_dt_vs_bc.py --config-name odt --dt-flags="--censor-bound None"   # ODT's recipe
    python benchmarks/bench_dt_vs_bc.py --config-name odt --report-only
    python benchmarks/bench_dt_vs_bc.py --config-name anneal --dt-flags="--anneal-lr"    # the annealed recipe
    python benchmarks/bench_dt_vs_bc.py --configs default anneal --report-only           # both, with the targets
"""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = "--scale cpu"  # the README's CPU config: 128x2 DT, batch 32, context 10, lr 1e-3, 3000 updates


@dataclass
class Args:
    datasets: tuple[str, ...] = (
        "Hopper-v4:local/hopper/medium-v0",
        "AdroitHandDoor-v1:local/door/human-v0",
        "Hopper-v4:generated/hopper/noisy-v0",
        "Hopper-v4:generated/hopper/random-v0",
    )
    """env_id:dataset pairs"""
    seeds: int = 3
    """seeds 1..seeds of each"""
    dt_flags: str = ""
    """extra pretrain_dt.py flags after the README's CPU config (e.g. the ODT recipe, to compare)"""
    config_name: str = "default"
    """names the DT logs (`dt_{config_name}_{dataset}_s{seed}.log`), so several --dt-flags share one --out-dir"""
    configs: tuple[str, ...] = ()
    """report these configurations' logs side by side (default: --config-name), with the recipe targets of each
    against the first"""
    bc: Literal["run", "none"] = "run"
    """run: run the MLP where its log is missing or unfinished; none: only read the logs already there (another
    invocation runs them)"""
    report_only: bool = False
    """run nothing; print the table from the logs in --out-dir"""
    eval_every: int = 500
    """updates between the DT's evaluations (3000 updates: the last 3 are at 2000, 2500 and 3000)"""
    eval_episodes: int = 20
    """evaluation episodes of both, per point"""
    bc_updates: int = 10_000
    """Adam updates of the MLP"""
    bc_eval_every: int = 2000
    """updates between the MLP's evaluations"""
    parallel: int = 2
    """runs at a time"""
    out_dir: str = "results/dt-vs-bc/logs"
    """where each run's log goes"""
    checkpoints_dir: str = "checkpoints/dt-vs-bc"
    """where each DT's checkpoint goes (`dt_{config_name}_{dataset}_s{seed}.pt`)"""
    bc_job: str = ""
    """run only the MLP of one ENV_ID:DATASET:SEED and print its evaluations (what the benchmark's BC subprocesses run)"""


def jobs(args: Args, out: Path):
    for pair in args.datasets:
        env_id, dataset = pair.split(":", 1)
        tag = dataset.replace("/", "-")
        for seed in range(1, args.seeds + 1):
            dt = [
                sys.executable,
                str(ROOT / "pretrain_dt.py"),
                "--env-id",
                env_id,
                "--dataset",
                dataset,
                "--seed",
                str(seed),
                *shlex.split(CPU_CONFIG),
                *shlex.split(args.dt_flags),
                "--eval-every",
                str(args.eval_every),
                "--eval-episodes",
                str(args.eval_episodes),
                "--save-every",
                "0",
                "--checkpoint",
                str(Path(args.checkpoints_dir) / f"dt_{args.config_name}_{tag}_s{seed}.pt"),
                "--runs-dir",
                str(Path("runs") / "dt-vs-bc" / args.config_name / f"{tag}_s{seed}"),
            ]
            if not dt_scores(out / f"dt_{args.config_name}_{tag}_s{seed}.log", finished=True):
                yield out / f"dt_{args.config_name}_{tag}_s{seed}.log", dt
            bc = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--bc-job",
                f"{env_id}:{dataset}:{seed}",
                "--bc-updates",
                str(args.bc_updates),
                "--bc-eval-every",
                str(args.bc_eval_every),
                "--eval-episodes",
                str(args.eval_episodes),
            ]
            if args.bc == "run" and not bc_scores(out / f"bc_{tag}_s{seed}.log"):
                yield out / f"bc_{tag}_s{seed}.log", bc


def run_bc(env_id: str, dataset: str, seed: int, updates: int, eval_every: int, eval_episodes: int) -> dict[int, float]:
    """The MLP's normalized score every `eval_every` Adam updates (batch 256, lr 3e-4); prints `seed N: update: score, ...`."""
    import torch
    import torch.nn as nn

    sys.path.insert(0, str(ROOT))
    import pretrain_dt as pt

    class MarkovPolicy(nn.Module):
        """An MLP behind the DT's call signature, so `pretrain_dt.evaluate` runs it unchanged (context 1)."""

        def __init__(self, state_dim, act_dim, hidden=256):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, act_dim)
            )

        def forward(self, rtg, states, actions, pad_mask):
            mean = self.net(states)
            return mean, torch.zeros_like(mean)

    torch.set_num_threads(1)
    _, trajs, ref_min, ref_max = pt.load_dataset(env_id, dataset, None, 0, 0)
    obs = np.concatenate([t["observations"] for t in trajs])
    mean, std = obs.mean(0).astype(np.float32), obs.std(0).astype(np.float32) + 1e-6
    states = torch.as_tensor((obs - mean) / std)
    actions = torch.as_tensor(np.concatenate([t["actions"] for t in trajs]))
    meta = dict(context_len=1, state_mean=mean, state_std=std, rtg_scale=1e-3, eval_rtg=0.0)
    envs = [pt.make_env(env_id) for _ in range(eval_episodes)]
    torch.manual_seed(seed)
    policy = MarkovPolicy(states.shape[1], actions.shape[1])
    opt = torch.optim.Adam(policy.parameters(), lr=3e-4)
    scores = {}
    for update in range(1, updates + 1):
        idx = torch.randint(len(states), (256,))
        loss = ((torch.tanh(policy.net(states[idx])) - actions[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if update % eval_every == 0:
            rets, _ = pt.evaluate(policy, envs, meta, pt.eval_seeds(seed, eval_episodes), "cpu")
            scores[update] = float(pt.normalized_score(rets, ref_min, ref_max).mean())
    print(f"seed {seed}: " + ", ".join(f"{u}: {s:.1f}" for u, s in scores.items()), flush=True)
    return scores


def dt_scores(log: Path, finished: bool = False) -> list[float]:
    """The evaluations in a pretrain_dt.py log; with `finished`, none unless the run wrote its checkpoint line."""
    text = log.read_text() if log.exists() else ""
    if finished and "\ncheckpoint: " not in text:
        return []
    return [float(x) for x in re.findall(r"^update \d+: .*normalized score (-?[\d.]+)", text, re.M)]


# Episodes that reach the time limit while earning less per step than the data: a hopper standing still, not hopping
TIME_LIMITS = {"Hopper": 1000, "Walker2d": 1000}


def dt_final_episodes(log: Path) -> tuple[float, float]:
    """(mean length, return per step) of a pretrain_dt.py log's final evaluation (NaN where the log predates them)."""
    text = log.read_text() if log.exists() else ""
    final = re.findall(r"^update \d+: .* length (\d+), (-?[\d.]+)/step", text, re.M)
    return (float(final[-1][0]), float(final[-1][1])) if final else (float("nan"), float("nan"))


def data_reward_per_step(env_id: str, dataset: str) -> float:
    """The dataset's reward per step (NaN where the dataset cannot be loaded here)."""
    sys.path.insert(0, str(ROOT))
    import pretrain_dt as pt

    try:
        trajs = pt.load_dataset(env_id, dataset, None, 0, 0)[1]
    except (pt.UserError, OSError, ValueError):
        return float("nan")
    return sum(t["rewards"].sum() for t in trajs) / sum(len(t["rewards"]) for t in trajs)


def bc_scores(log: Path) -> list[float]:
    line = re.search(r"^seed \d+: (.*)$", log.read_text(), re.M) if log.exists() else None
    return [float(x) for x in re.findall(r"\d+: (-?[\d.]+)", line.group(1))] if line else []


def main(args: Args):
    if args.bc_job:
        env_id, dataset, seed = args.bc_job.split(":")
        run_bc(env_id, dataset, int(seed), args.bc_updates, args.bc_eval_every, args.eval_episodes)
        return
    bad = [p for p in args.datasets if ":" not in p]
    if bad:
        sys.exit(f"error: --datasets takes ENV_ID:DATASET pairs (e.g. Hopper-v4:local/hopper/medium-v0); got {bad}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = [] if args.report_only else list(jobs(args, out)), {}
    while pending or running:
        while pending and len(running) < args.parallel:
            log, cmd = pending.pop(0)
            proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
            running[proc.pid] = log
        pid, status = os.wait()  # whichever run ends first frees its slot
        if status != 0:
            sys.exit(f"error: {running[pid].name} failed, see {running[pid]}")
        del running[pid]

    report(args, out)


def report(args: Args, out: Path):
    """Per dataset: each configuration's DT, then the MLP; with two or more configurations, the targets of each
    against the first."""
    configs = args.configs or (args.config_name,)
    print(f"DT: the README's CPU config {CPU_CONFIG}, then each configuration's --dt-flags ({', '.join(configs)})")
    print(f"{'dataset':<30} {'':>12} {'final per seed':>22} {'last-3 range per seed':>22} {'final':>13} {'last-3':>6}")
    for pair in args.datasets:
        env_id, dataset = pair.split(":", 1)
        tag, seeds = dataset.replace("/", "-"), range(1, args.seeds + 1)
        rows = {}
        for who in [*configs, "MLP"]:
            logs = [out / (f"bc_{tag}_s{s}.log" if who == "MLP" else f"dt_{who}_{tag}_s{s}.log") for s in seeds]
            runs = [bc_scores(log) if who == "MLP" else dt_scores(log, finished=True) for log in logs]
            if not all(runs):
                print(f"{dataset:<30} {who:>12} missing runs in {out}")
                continue
            final, ranges = np.array([r[-1] for r in runs]), np.array([np.ptp(r[-3:]) for r in runs])
            rows[who] = dict(final=final, ranges=ranges, last3=np.mean([np.mean(r[-3:]) for r in runs]))
            degenerate = []
            if who != "MLP" and env_id.partition("-")[0] in TIME_LIMITS:
                episodes, data = [dt_final_episodes(log) for log in logs], data_reward_per_step(env_id, dataset)
                limit = TIME_LIMITS[env_id.partition("-")[0]]
                degenerate = [s for s, (n, r) in zip(seeds, episodes) if n >= limit and r < data]
                known = not np.isnan([e[0] for e in episodes]).any() and np.isfinite(data)
                rows[who]["degenerate"] = degenerate if known else None
                rows[who]["episodes_line"] = (
                    f"{'':<30} {'':>12} final episodes: length "
                    + ", ".join(f"{n:.0f} at {r:.2f}/step" for n, r in episodes)
                    + f" (data: {data:.2f}/step, time limit {limit})"
                )
            print(
                f"{dataset:<30} {who:>12} {' '.join(f'{x:6.1f}' for x in final):>22} "
                f"{' '.join(f'{x:6.1f}' for x in ranges):>22} {final.mean():6.1f}±{final.std():5.1f} {rows[who]['last3']:6.1f}"
                + (f"  degenerate seeds: {degenerate}" if degenerate else "")
            )
            if "episodes_line" in rows[who]:
                print(rows[who]["episodes_line"])
        if "MLP" in rows and configs[0] in rows:
            dt, mlp = rows[configs[0]], rows["MLP"]
            verdict = "DT >= MLP" if dt["last3"] >= mlp["last3"] else "DT < MLP"
            print(f"{'':<30} {verdict} on the last-3 mean over seeds ({dt['last3']:.1f} vs {mlp['last3']:.1f})")
        for new in [c for c in configs[1:] if c in rows and configs[0] in rows]:
            old, b = rows[configs[0]], rows[new]
            mlp = rows["MLP"]["final"] if "MLP" in rows else np.full(2, np.nan)
            mlp_floor = mlp.mean() - mlp.std(ddof=1) / np.sqrt(len(mlp))  # one standard error below the MLP's mean
            checks = {
                "every seed's last-3 range <= half": (b["ranges"] <= old["ranges"] / 2).all(),
                "final std <= half": b["final"].std() <= old["final"].std() / 2,
                "mean final >= old": b["final"].mean() >= old["final"].mean(),
                f"mean final >= MLP - s.e. ({mlp_floor:.1f})": b["final"].mean() >= mlp_floor,
            }
            if "degenerate" in b:
                checks["no degenerate final DT"] = b["degenerate"] == [] if b["degenerate"] is not None else None
            shown = {None: "n/a (old log)", True: "yes", False: "NO"}
            print(f"{'':<30} {new} against {configs[0]}: " + "; ".join(f"{k}: {shown[v]}" for k, v in checks.items()))


if __name__ == "__main__":
    main(tyro.cli(Args))
