"""Side-by-side comparison: every method on the same env, data and seeds, from ONE shared pretrained checkpoint.

Each run is a separate subprocess of a finetuning script (they share nothing but the checkpoint); its TensorBoard
log is read back with tensorboard's `EventAccumulator`. Writes `results/<name>/summary.md` (final normalized score
mean ± std over seeds, env steps, gradient updates, wall time; a failed run is shown as FAILED, never dropped and
never as zero) and `results/<name>/curves.png` (normalized score vs iteration and vs env steps, seed bands).
TensorBoard logs and per-run stdout/stderr go to `results/<name>/raw/`, the shared checkpoint (made once per task
and pretraining flags, reused by every preset) to `checkpoints/compare/`; both are git-ignored. Each finished run's
outcome and the scalars the summary reads are also kept in `results/<name>/records/<task>/<method>__s<seed>.json`,
which is committed, so seeds run on different machines or sessions summarize together (`--summarize-only`); each
record names the commit its run started at, and the summary lists them. IQL (iql.py) is the one method that takes no
checkpoint: it pretrains itself on the same env and data for as many updates as the shared DT, logs against env
steps (so it is drawn on the env-step panel only) and gets the env-step budget as --online-steps.

Budgets, the same for every method and combinable (a run stops at the first it reaches): `--budget-env-steps`
(training env steps, the scripts' --total-env-steps), `--budget-iterations` (the scripts' --num-iterations; IQL has no
iterations and needs an env-step budget beside it) and `--budget-seconds` (wall clock, --max-seconds). Env steps and
iterations mean the same run on any machine; seconds do not.

`--scale` is passed to pretrain_dt.py and to every finetuning script that takes the checkpoint: cpu pretrains the
README's 128x2 DT and makes grpo_dt.py explore narrowly (--narrow-exploration, as the cpu presets always ran); paper
is the paper's DT and the scripts' paper values (grpo_dt.py at the paper's sigma and epsilon). All runs use
grpo_dt.py (no worker processes; grpo_dt_fast.py is the same algorithm with them).

Presets (on local/hopper/medium-v0, plus local/door/human-v0 where the paper shows Door):
    table1-cpu      all methods on the same budget (Table 1)            hopper, door
    fig1-relabel    PPO-DT and GRPO-DT with and without --relabel (Fig. 1)  hopper, door
    fig2-ablations  the five GRPO-DT design ablations (Fig. 2a-e)       hopper
    fig4-lengths    L_traj sweep (--subtraj-len), L_eval sweep (--eval-len) (Fig. 4c, 4d)  hopper
    fig4a-models    the pretrained DT and Reinformer, and GRPO-DT from each (Fig. 4a)  hopper
    fig4b-qguided   reset-based vs Q-guided GRPO-DT (Fig. 4b)           hopper
    ppo-ctrain      PPO-DT's sub-trajectory length c_train = c_online (1) vs c_offline (the DT's context)
                                                                        hopper

Examples:
    python benchmarks/compare.py --preset table1-cpu --seeds 1 --budget-env-steps 5000
    python benchmarks/compare.py --preset table1-cpu --seeds 1 2 --budget-seconds 300 --tasks hopper
    python benchmarks/compare.py --preset fig1-relabel --methods grpo-dt grpo-dt-relabel --dry-run
    python benchmarks/compare.py --preset fig2-ablations --scale paper --seeds 1 2 3 --budget-iterations 100  # GPU
"""

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    preset: str = "table1-cpu"
    """experiment preset: table1-cpu, fig1-relabel, fig2-ablations, fig4-lengths, fig4a-models, fig4b-qguided, ppo-ctrain"""
    scale: Literal["cpu", "paper"] = "cpu"
    """cpu: small model and per-script size overrides; paper: the scripts' own (paper) sizes, for a GPU machine"""
    name: Optional[str] = None
    """results go to `{results_dir}/{name}`; default `{preset}` (`{preset}-paper` at paper scale)"""
    results_dir: str = "results"
    """root of the results folders"""
    seeds: tuple[int, ...] = (1, 2)
    """run seeds, the same for every method (two comparisons with different seeds can share the cores; then
    `--summarize-only` with all of them writes the joint table)"""
    methods: Optional[tuple[str, ...]] = None
    """only these method keys (see --dry-run for a preset's keys), e.g. `--methods dt grpo-dt`"""
    tasks: Optional[tuple[str, ...]] = None
    """only these of the preset's tasks: hopper, door"""
    env_id: Optional[str] = None
    """run on this env instead of the preset's tasks (with --dataset)"""
    dataset: Optional[str] = None
    """dataset for --env-id (a Minari id such as local/hopper/medium-v0)"""
    budget_env_steps: int = 0
    """per-run budget in training env steps, passed as --total-env-steps (0 = none)"""
    budget_iterations: int = 0
    """per-run budget in iterations, passed as --num-iterations to every script that has it (0 = none: 100000 when
    another budget is set, so that budget stops the run, else the script's own)"""
    budget_seconds: float = 0.0
    """per-run wall-clock budget, passed as --max-seconds (0 = none)"""
    eval_episodes: int = 20
    """evaluation episodes per evaluation, the same for every method (IQL included)"""
    eval_rtg: Optional[float] = None
    """RTG of every DT method's evaluation; default the task's g_online (Table 6: 7200 Hopper, 3000 door)"""
    checkpoint: Optional[str] = None
    """use this pretrained checkpoint (one task only) instead of running pretrain_dt.py"""
    checkpoints_dir: str = "checkpoints/compare"
    """where pretrain_dt.py writes the shared checkpoints; reused by any preset with the same pretraining flags"""
    threads: Optional[int] = None
    """OMP_NUM_THREADS and MKL_NUM_THREADS of every run (torch's threads follow them); default 1 at cpu scale
    (oversubscribed cores are far slower), else unset"""
    run_timeout: float = 0.0
    """kill a run after this many seconds and report it FAILED (0 = never)"""
    scripts_dir: str = str(ROOT)
    """folder holding pretrain_dt.py and the finetuning scripts"""
    dry_run: bool = False
    """print the commands and exit"""
    summarize_only: bool = False
    """run nothing: rebuild summary.md and curves.png from the runs already recorded under `{name}/raw/`"""
    rerun: bool = False
    """run every run again; by default a run that already finished (exit 0, recorded under `{name}/raw/`) is kept and
    only the missing or failed ones run, so a killed comparison goes on where it stopped"""


class UserError(Exception):
    """Bad input: printed as one line, never as a traceback."""


# ---------------------------------------------------------------- methods, tasks and presets
@dataclass(frozen=True)
class Method:
    key: str  # for --methods and file names
    label: str  # in the table and the legend
    script: str
    args: tuple = ()
    reference: bool = False  # evaluates the checkpoint only (no finetuning, no budget)
    uses_checkpoint: bool = True  # False: pretrains itself on the same env and data (IQL), gets no --checkpoint
    steps_are_env_steps: bool = False  # its scalars are logged against env steps, not iterations (IQL)
    pretrain: tuple = ()  # extra pretrain_dt.py flags of its checkpoint (methods with the same share one)
    eval_context: Literal["table6", "odt"] = "table6"  # evaluated at Table 6's c_online, or at ODT's acting context


TASKS = {"hopper": ("Hopper-v4", "local/hopper/medium-v0"), "door": ("AdroitHandDoor-v1", "local/door/human-v0")}
DT = Method("dt", "pretrained DT (no finetuning)", "grpo_dt.py", ("--num-iterations", "0"), reference=True)
GRPO = Method("grpo-dt", "GRPO-DT", "grpo_dt.py")
PPO = Method("ppo-dt", "PPO-DT", "ppo_dt.py")
IQL = Method("iql", "IQL", "iql.py", uses_checkpoint=False, steps_are_env_steps=True)
TABLE1 = [
    DT,
    IQL,
    replace(DT, key="dt-odt-context", label="pretrained DT at ODT's context", eval_context="odt"),
    Method("odt", "ODT", "odt_td3.py", ("--algo", "odt"), eval_context="odt"),
    Method("odt-td3", "ODT+TD3", "odt_td3.py", eval_context="odt"),
    PPO,
    GRPO,
    Method("qguided", "Q-guided GRPO-DT", "grpo_dt_qguided.py"),
]
# With --scale cpu, Table 1 has GRPO-DT twice: the CPU preset's (narrow exploration, gamma 1 on MuJoCo) and the
# paper's settings (grpo_dt.py's --scale paper from the same checkpoint: Table 6's exploration and gamma)
GRPO_PAPER_SETTINGS = Method("grpo-dt-paper", "GRPO-DT (paper settings)", "grpo_dt.py", ("--scale", "paper"))
# Fig. 2a-e, each against GRPO-DT with all its components: (run key, grpo_dt.py flags)
ABLATIONS = {
    "full-trajectory": ("--full-trajectory",),
    "no-consistent-reset": ("--no-consistent-reset",),
    "token-level-ratio": ("--ratio", "token"),
    "uniform-reset-sampling": ("--reset-sampling", "uniform"),
    "geometric-mean-ratio": ("--ratio", "geometric"),
}
# (default L_traj, L_eval; other L_traj; other L_eval): the paper's Hopper row is 15, 400 (Table 6), at both scales.
LENGTHS = (15, 400, (5, 50), (50, 200))

# --scale cpu: the README's CPU-sized DT (pretrain_dt.py --scale cpu: 128x2, 3000 updates) and each script's
# own per-iteration sizes (Tables 5-7, the ODT+TD3 reference), except where one update would not fit a CPU: the
# replay methods' batches of 256 DT segments (ODT+TD3: 0.6 s per critic update on one core, its 10k-update critic
# pretraining 100 min; at 32, ~0.08 s) and ODT+TD3's critic pretraining (1000 updates, not 10k).
CPU_DT_UPDATES = 3000  # pretrain_dt.SCALES["cpu"]["num_updates"] (tested)
# pretrain_dt.py's default likelihood, named so that the shared checkpoint's hashed file name changes with it: a
# checkpoint pretrained with another likelihood (ODT's density) is never picked up for a preset run
PRETRAIN_LIKELIHOOD = ("--censor-bound", "0.99")
# pretrain_dt.CHECKPOINT_FORMAT_VERSION (tested), hashed into the shared checkpoint's name with the flags, so a
# checkpoint file of another format is never reused
CHECKPOINT_FORMAT_VERSION = 2
CPU_OVERRIDES: dict[str, tuple] = {
    "grpo_dt_qguided.py": ("--critic-batch-size", "32"),
    "odt_td3.py": ("--n-batch", "32", "--critic-pretrain-updates", "1000"),
    # IQL pretrains as many updates as the shared DT (App. B.1); it evaluates every 1000 env steps for the curves
    "iql.py": ("--offline-updates", str(CPU_DT_UPDATES), "--eval-every", "1000"),
}
# The one evaluation protocol: every DT method is scored at the task's g_online (the RTG the pure-RL methods train
# on), on the same episodes (`eval_seeds`), each at the context it acts with: Table 6's c_online for the pure-RL
# methods, ODT's own (5 on MuJoCo, as its reference evaluates) for ODT and ODT+TD3. IQL gets the episodes only.
G_ONLINE = dict(Hopper=7200, Walker2d=10000, Ant=12000, HalfCheetah=12000, AdroitHandDoor=3000, AdroitHandPen=6000)
G_ONLINE.update(AdroitHandHammer=4000, AntMaze_UMaze=2)


def eval_flags(args: Args, m: Method, env_id: str, dataset: str) -> list:
    flags = ["--eval-episodes", str(args.eval_episodes)]
    if not m.uses_checkpoint:  # IQL: no RTG, no context
        return flags
    name = env_id.rpartition("-")[0]
    if args.eval_rtg is None and name not in G_ONLINE:
        raise UserError(f"no g_online known for --env-id {env_id}; pass --eval-rtg")
    rtg = args.eval_rtg if args.eval_rtg is not None else G_ONLINE[name]
    return flags + ["--eval-rtg", str(rtg), "--eval-context-len", str(eval_context(m, env_id, dataset))]


def c_online(env_id: str, dataset: str) -> int:
    return 5 if env_id.startswith("AdroitHandHammer") or "umaze-diverse" in dataset else 1  # Table 6


def eval_context(m: Method, env_id: str, dataset: str) -> int:
    """The context a method is scored at: Table 6's c_online, or ODT's acting context (odt_td3.py's c_online: 5 on
    MuJoCo and pen, 1 on door, hammer and AntMaze, as Zheng et al. and Yan et al. act and evaluate; tested equal)."""
    if m.eval_context == "odt":
        return 5 if env_id.partition("-")[0] in ODT_CONTEXT_5 else 1
    return c_online(env_id, dataset)


ODT_CONTEXT_5 = ("Hopper", "Walker2d", "Ant", "HalfCheetah", "AdroitHandPen")


def data_rtg_command(args: Args, run: "Run", env_id: str, dataset: str, model: Path, log_dir: Path) -> list:
    """Both RTGs: each DT method's final model (`--save-model`; the pretrained DT row: the shared checkpoint) is
    scored once more, by one script (`grpo_dt.py --num-iterations 0`) on the same episodes and context, at the
    checkpoint's own eval RTG (the data's scale, ODT's target: 3600 Hopper) instead of g_online."""
    return [
        sys.executable,
        str(Path(args.scripts_dir) / "grpo_dt.py"),
        *("--env-id", env_id, "--dataset", dataset, "--checkpoint", str(model), "--seed", str(run.seed)),
        *("--exp-name", f"{run.method.key}-data-rtg", "--runs-dir", str(log_dir), "--num-iterations", "0"),
        *("--eval-episodes", str(args.eval_episodes), "--eval-context-len", str(eval_context(run.method, env_id, dataset))),
    ]


# iql.py's online length when only a wall-clock budget is given (--max-seconds then stops it).
IQL_UNBOUNDED_STEPS = 10_000_000
# The late-window score: every evaluation logged in the last quarter of a run's logging time, averaged. Single
# evaluations of one run swing by tens of points between checkpoints minutes apart (README, Table 1 at CPU scale).
LATE_WINDOW = 0.25


# The paper's Table 1 (normalized score, 3 seeds, paper-scale models and budgets), shown beside table1-cpu results.
PAPER_TABLE1 = {
    "hopper": {
        "dt": "46.46",
        "iql": "74.19 ± 20.25",
        "odt": "98.02 ± 0.63",
        "odt-td3": "101.47 ± 2.29",
        "ppo-dt": "105.65 ± 5.43",
        "grpo-dt": "108.81 ± 0.85",
    },
    "door": {
        "dt": "3.28",
        "iql": "11.27 ± 0.44",
        "odt": "8.76 ± 3.87",
        "odt-td3": "79.73 ± 4.37",
        "ppo-dt": "94.12 ± 3.99",
        "grpo-dt": "89.33 ± 10.12",
    },
}


def grpo(key: str, label: str, *flags) -> Method:
    return Method(key, label, "grpo_dt.py", tuple(flags))


def preset_runs(preset: str, scale: str) -> tuple[list[str], list[Method]]:
    """(task names, methods) of a preset; a one-line error naming the valid presets otherwise."""
    if preset == "table1-cpu":
        if scale != "cpu":
            return ["hopper", "door"], TABLE1
        cpu_preset = replace(GRPO, label="GRPO-DT (CPU preset)")
        return ["hopper", "door"], [*(cpu_preset if m is GRPO else m for m in TABLE1[:-1]), GRPO_PAPER_SETTINGS, TABLE1[-1]]
    if preset == "fig1-relabel":
        relabel_ppo = Method("ppo-dt-relabel", "PPO-DT --relabel", "ppo_dt.py", ("--relabel",))
        return ["hopper", "door"], [DT, PPO, relabel_ppo, GRPO, grpo("grpo-dt-relabel", "GRPO-DT --relabel", "--relabel")]
    if preset == "fig2-ablations":
        arms = [grpo(k, f"GRPO-DT {' '.join(f)}", *f) for k, f in ABLATIONS.items()]
        # whole episodes in one update hold ~20 GB of activations: grpo_dt_fast.py runs the same update in chunks
        arms[0] = replace(arms[0], script="grpo_dt_fast.py")
        return ["hopper"], [DT, GRPO] + arms
    if preset == "fig4-lengths":
        lt, le, trajs, evals = LENGTHS
        return ["hopper"], [DT, Method("grpo-dt", f"GRPO-DT (L_traj={lt}, L_eval={le})", "grpo_dt.py")] + [
            grpo(f"ltraj-{n}", f"L_traj={n}, L_eval={le}", "--subtraj-len", str(n)) for n in trajs
        ] + [grpo(f"leval-{n}", f"L_traj={lt}, L_eval={n}", "--eval-len", str(n)) for n in evals]
    if preset == "fig4a-models":  # the same size and budget; only the pretrained model differs
        rf = ("--arch", "reinformer")
        reinformer = replace(DT, key="reinformer", label="pretrained Reinformer (no finetuning)", pretrain=rf)
        return ["hopper"], [
            DT,
            GRPO,
            reinformer,
            replace(GRPO, key="grpo-reinformer", label="GRPO-DT on Reinformer", pretrain=rf),
        ]
    if preset == "fig4b-qguided":
        return ["hopper"], [DT, GRPO, TABLE1[-1]]
    if preset == "ppo-ctrain":  # the paper leaves c_train open; c_offline is the pretrained DT's context length
        c_offline = "10" if scale == "cpu" else "20"
        label = f"PPO-DT c_train = c_offline ({c_offline})"
        return ["hopper"], [DT, PPO, Method("ppo-dt-ctrain-offline", label, "ppo_dt.py", ("--c-train", c_offline))]
    raise UserError(
        f"unknown --preset {preset!r}; valid: table1-cpu, fig1-relabel, fig2-ablations, fig4-lengths, fig4a-models, "
        "fig4b-qguided, ppo-ctrain"
    )


def finetune_command(args: Args, m: Method, env_id: str, dataset: str, ckpt: Path, seed: int, runs_dir: Path) -> list:
    cmd = [
        sys.executable,
        str(Path(args.scripts_dir) / m.script),
        "--env-id",
        env_id,
        "--dataset",
        dataset,
        *(("--checkpoint", str(ckpt)) if m.uses_checkpoint else ()),
        "--seed",
        str(seed),
        "--exp-name",
        m.key,
        "--runs-dir",
        str(runs_dir),
    ]
    if m.uses_checkpoint:  # cpu: grpo_dt.py explores narrowly (--narrow-exploration), as the cpu presets always ran
        cmd += ["--scale", args.scale]
    if args.scale == "cpu":
        cmd += list(CPU_OVERRIDES.get(m.script, ()))
    cmd += eval_flags(args, m, env_id, dataset)
    if m.uses_checkpoint and not m.reference:
        cmd += ["--save-model"]  # the final model, scored again at the data's RTG (data_rtg_command)
    if not m.reference:
        other_budget = args.budget_env_steps > 0 or args.budget_seconds > 0
        iters = args.budget_iterations or (100_000 if other_budget else None)
        if m.steps_are_env_steps:  # no iterations: the online length is in env steps (an iteration budget is ignored)
            if other_budget:
                cmd += ["--online-steps", str(args.budget_env_steps or IQL_UNBOUNDED_STEPS)]
        elif iters is not None:
            cmd += ["--num-iterations", str(iters)]
        if args.budget_env_steps > 0:
            cmd += ["--total-env-steps", str(args.budget_env_steps)]
        if args.budget_seconds > 0:
            cmd += ["--max-seconds", str(args.budget_seconds)]
    return cmd + list(m.args)  # the method's own flags last, so they win over the size overrides


# ---------------------------------------------------------------- reading and summarising logs
def read_scalars(log_dir) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """All scalars under a TensorBoard run folder: tag -> (steps, values, wall-clock times), by tensorboard's
    EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    if not files:
        return {}
    acc = EventAccumulator(str(files[0].parent), size_guidance={SCALARS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps, values = np.array([e.step for e in events]), np.array([e.value for e in events], dtype=float)
        out[tag] = (steps, values, np.array([e.wall_time for e in events]))
    return out


@dataclass
class Run:
    """One (task, method, seed) subprocess and what it logged."""

    task: str
    method: Method
    seed: int
    cmd: list = field(default_factory=list)
    returncode: Optional[int] = None
    wall_time: float = float("nan")
    error: str = ""  # why it failed: "exit 1: <last stderr line>"
    script_sha: str = ""  # sha1 of the script file when the run started (scripts can change between runs)
    commit: str = ""  # the repository's commit when the run started (git_commit)
    scalars: dict = field(default_factory=dict)
    data_rtg_score: float = float("nan")  # the final model at the checkpoint's eval RTG (data_rtg_command)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and "charts/normalized_score" in self.scalars

    def last(self, tag: str) -> float:
        if tag not in self.scalars:  # the checkpoint-only evaluation takes no training steps or updates
            return 0.0 if self.method.reference and tag in ("charts/env_steps", "charts/grad_updates") else float("nan")
        return float(self.scalars[tag][1][-1])

    def late_mean(self, tag: str = "charts/normalized_score") -> float:
        """Mean of the values logged in the last LATE_WINDOW of the run's logging time: a score that one lucky or
        unlucky final evaluation cannot decide, over the same share of the budget for every method."""
        _, values, wall = self.scalars[tag]
        return float(values[wall >= wall[0] + (1 - LATE_WINDOW) * (wall[-1] - wall[0])].mean())


KEPT_TAGS = ("charts/normalized_score", "charts/env_steps", "charts/grad_updates")  # what the summary and plot read
KEPT_FIELDS = ("returncode", "wall_time", "error", "script_sha", "data_rtg_score", "commit")


def keep_run(run: Run, path: Path):
    """Write a finished (or failed) run's outcome and summary scalars where git sees them (raw/ dies with the
    machine)."""
    kept = {k: getattr(run, k) for k in KEPT_FIELDS}
    kept["command"] = show(run.cmd)
    kept["scalars"] = {t: [a.tolist() for a in run.scalars[t]] for t in KEPT_TAGS if t in run.scalars}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept) + "\n")


def load_kept(run: Run, path: Path):
    """A kept run as it ran, its own command included (a record may come from another comparison of the same
    checkpoint and flags, e.g. fig1-relabel's runs without --relabel are table1-cpu's)."""
    kept = json.loads(path.read_text())
    for k in KEPT_FIELDS:
        setattr(run, k, kept.get(k, ""))  # a record without a "commit" field: not recorded
    run.cmd = [sys.executable, *shlex.split(kept["command"])[1:]]
    run.scalars = {t: tuple(np.array(x) for x in v) for t, v in kept["scalars"].items()}


def git_commit() -> str:
    """HEAD of this repository (10 hex digits), "+ uncommitted changes" when a top-level script differs from it;
    "" where git cannot tell."""
    try:
        git = dict(cwd=ROOT, capture_output=True, text=True, check=True)
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], **git).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":(glob)*.py"], **git).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + (" + uncommitted changes" if dirty else "")


def show(cmd: list) -> str:
    """A command as a shell line, with `python` and a relative script path (the runs use sys.executable)."""
    return shlex.join(["python", os.path.relpath(cmd[1]), *cmd[2:]])


def last_line(text: str) -> str:
    """The most telling stderr line: the last one naming an error (tyro's boxes stripped), else the last one."""
    lines = [ln.strip(" │╭╮╰╯─") for ln in re.split(r"[\r\n]+", text)]
    lines = [ln for ln in lines if re.search(r"\w", ln)]
    errors = [ln for ln in lines if re.search(r"(?i)error|exception|unrecognized|invalid|killed", ln)]
    return (errors or lines or ["(no stderr)"])[-1][:200]


def mean_or_none(xs: list) -> Optional[float]:
    return float(np.mean(xs)) if xs else None


def summarize(runs: list[Run]) -> dict:
    """Per method: final normalized score mean/std over the seeds that finished (np.std, ddof=0) and the failures."""
    ok, done = [r for r in runs if r.ok], [r for r in runs if r.returncode is not None]
    scores, late = [r.last("charts/normalized_score") for r in ok], [r.late_mean() for r in ok]
    return dict(
        n=len(runs),
        n_ok=len(ok),
        pending=len(runs) - len(done),
        mean=mean_or_none(scores),
        std=float(np.std(scores)) if ok else None,
        late=mean_or_none(late),
        late_std=float(np.std(late)) if ok else None,
        start=mean_or_none([r.scalars["charts/normalized_score"][1][0] for r in ok]),
        env_steps=mean_or_none([r.last("charts/env_steps") for r in ok]),
        grad_updates=mean_or_none([r.last("charts/grad_updates") for r in ok]),
        wall_time=mean_or_none([r.wall_time for r in done]),
        data_rtg=[r.data_rtg_score for r in ok if np.isfinite(r.data_rtg_score)],
        fails=[f"seed {r.seed}: {r.error or 'no charts/normalized_score logged'}" for r in done if not r.ok],
    )


def fmt(x, digits=0) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:,.{digits}f}"


def format_summary(title: str, header: list[str], sections: dict[str, dict[str, list[Run]]], paper: dict = None) -> str:
    """Markdown: a table per task (one row per method, in preset order), then every run's command and status.

    `paper` (task -> method key -> text) adds a last column with the paper's own numbers."""
    out = [f"# {title}", "", *header, ""]
    for task, by_method in sections.items():
        extra = " Paper (Table 1, paper scale) |" if paper else ""
        out += [
            f"## {task}",
            "",
            f"| Method | Eval context | Final normalized score | Mean of the last {LATE_WINDOW:.0%} | Iteration-0 score "
            "| Seeds OK | Env steps | Grad updates | Wall time (s) | Final at the data's RTG | Status |" + extra,
            "|---" * (12 if paper else 11) + "|",
        ]
        for runs in by_method.values():
            s = summarize(runs)
            score = f"{s['mean']:.2f} ± {s['std']:.2f}" if s["n_ok"] else "FAILED" if s["fails"] else "pending"
            late = f"{s['late']:.2f} ± {s['late_std']:.2f}" if s["n_ok"] else "—"
            status = (
                "ok"
                if not s["fails"]
                else ("FAILED: " if s["n_ok"] == 0 else "partly FAILED: ") + "; ".join(s["fails"]).replace("|", "/")
            )
            status += f" ({s['pending']} pending)" if s["pending"] else ""
            at_data = s["data_rtg"] and f"{np.mean(s['data_rtg']):.2f} ± {np.std(s['data_rtg']):.2f}"
            m = runs[0].method  # the context each run was scored at, from the command it ran (or will run) with
            contexts = {r.cmd[r.cmd.index("--eval-context-len") + 1] for r in runs if "--eval-context-len" in r.cmd}
            context = ", ".join(sorted(contexts)) or "—"
            out.append(
                f"| {m.label} | {context} | {score} | {late} | {fmt(s['start'], 2)} | {s['n_ok']}/{s['n']} | "
                f"{fmt(s['env_steps'])} | {fmt(s['grad_updates'])} | {fmt(s['wall_time'], 1)} | {at_data or '—'} | {status} |"
                + (f" {paper.get(task, {}).get(m.key.removesuffix('-paper'), '—')} |" if paper else "")
            )
        out += [
            "",
            "<details><summary>runs</summary>",
            "",
            f"| Method | Seed | Exit | Score | Last {LATE_WINDOW:.0%} | Env steps | Updates | Wall (s) | Command |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for runs in by_method.values():
            for r in runs:
                score = (
                    f"{r.last('charts/normalized_score'):.2f}" if r.ok else "FAILED" if r.returncode is not None else "pending"
                )
                out.append(
                    f"| {r.method.label} | {r.seed} | {r.returncode} | {score} | {fmt(r.late_mean(), 2) if r.ok else '—'} | "
                    f"{fmt(r.last('charts/env_steps'))} | {fmt(r.last('charts/grad_updates'))} | "
                    f"{fmt(r.wall_time, 1)} | `{show(r.cmd)}` |"
                )
        out += ["", "</details>", ""]
    return "\n".join(out)


def seed_band(curves: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray):
    """Mean and std over seeds on a common x grid, NaN wherever a seed has no data (each seed is interpolated only
    within its own x range), so the mean never jumps where a shorter seed stops."""
    ys = np.full((len(curves), len(grid)), np.nan)
    for i, (x, y) in enumerate(curves):
        inside = (grid >= x[0]) & (grid <= x[-1])
        ys[i, inside] = np.interp(grid[inside], x, y)
    return ys.mean(0), ys.std(0)


def score_curves(run: Run) -> tuple[tuple, tuple]:
    """(iteration, score) and (env steps, score); env steps at each evaluated iteration, interpolated by iteration.
    A method logged against env steps has no iteration curve: (None, (env steps, score))."""
    it, score = run.scalars["charts/normalized_score"][:2]
    if run.method.steps_are_env_steps:
        return None, (it, score)
    steps_it, steps = run.scalars.get("charts/env_steps", (np.zeros(1), np.zeros(1)))[:2]
    if steps_it[0] > 0:  # iteration 0 (the checkpoint) has taken no env steps, logged or not
        steps_it, steps = np.concatenate([[0], steps_it]), np.concatenate([[0.0], steps])
    env = np.interp(it, steps_it, steps)
    order = np.argsort(env, kind="stable")
    return (it, score), (env[order], score[order])


def plot_bars(sections: dict[str, dict[str, list[Run]]], path: Path, title: str):
    """One panel per task: a bar per method at the mean over seeds of the table's score (the mean of the last
    LATE_WINDOW), a mark per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sections), figsize=(6.5 * len(sections), 4.8), squeeze=False)
    for ax, (task, by_method) in zip(axes[0], sections.items()):
        for k, (color, runs) in enumerate(zip(plt.cm.tab10.colors * 3, by_method.values())):
            late = [r.late_mean() for r in runs if r.ok]
            if late:
                ax.bar(k, np.mean(late), color=color, alpha=0.6)
                ax.plot(np.full(len(late), k) + np.linspace(-0.15, 0.15, len(late)), late, "ko", ms=4)
        ax.set_xticks(range(len(by_method)), [runs[0].method.label for runs in by_method.values()], rotation=30, ha="right")
        ax.set(ylabel=f"normalized score, mean of the last {LATE_WINDOW:.0%}", title=task)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{title}  (bar: mean over seeds; dot: a seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(sections: dict[str, dict[str, list[Run]]], path: Path, title: str) -> np.ndarray:
    """One row per task: normalized score vs iteration and vs env steps; a line per method, mean ± std band.
    Returns the (tasks, 2) axes (for tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sections), 2, figsize=(13, 4.2 * len(sections)), squeeze=False)
    for row, (task, by_method) in zip(axes, sections.items()):
        for color, runs in zip(plt.cm.tab10.colors * 3, by_method.values()):
            ok, m = [r for r in runs if r.ok], runs[0].method
            failed = sum(r.returncode is not None and not r.ok for r in runs)
            label = m.label + (f" ({failed}/{len(runs)} FAILED)" if failed else "")
            if not ok:
                row[0].plot([], [], color=color, ls=":", label=label)
                continue
            if m.steps_are_env_steps:  # no iterations: drawn on the env-step panel only, named in the legend
                row[0].plot([], [], color=color, label=label + " (env-step panel only)")
            for ax, j in ((row[1], 1),) if m.steps_are_env_steps else ((row[0], 0), (row[1], 1)):
                curves = [score_curves(r)[j] for r in ok]
                if m.reference:  # a horizontal reference: the checkpoint's score, mean ± std over seeds
                    y = np.array([c[1][-1] for c in curves])
                    ax.axhline(y.mean(), color=color, ls="--", label=label if j == 0 else None)
                    ax.axhspan(y.mean() - y.std(), y.mean() + y.std(), color=color, alpha=0.12)
                    continue
                grid = np.unique(np.concatenate([c[0] for c in curves]))
                mean, std = seed_band(curves, grid)
                ax.plot(
                    grid,
                    mean,
                    color=color,
                    label=label if j == 0 and not m.steps_are_env_steps else None,
                    marker="." if len(grid) < 30 else None,
                )
                ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2)
                for x, y in curves:  # each seed, thin: shows where the seeds run past the shortest one
                    ax.plot(x, y, color=color, lw=0.7, alpha=0.45)
        ends = [r.last("charts/env_steps") for runs in by_method.values() for r in runs if r.ok]
        ends = [e for e in ends if e > 0]
        if ends and max(ends) > 20 * min(ends):  # methods differ by orders of magnitude in env steps per budget
            row[1].set_xscale("symlog", linthresh=10 ** np.floor(np.log10(min(ends))))
        for ax, xlabel in zip(row, ("iteration", "env steps")):
            ax.set(xlabel=xlabel, ylabel="normalized score", title=f"{task}: score vs {xlabel}")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle(f"{title}  (thick: mean over seeds where all have data; band: ± std; thin: each seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return axes


# ---------------------------------------------------------------- running
def run_process(cmd: list, log_prefix: Path, timeout: float, env: dict) -> tuple[int, float, str]:
    """Run one subprocess, stdout/stderr to `{log_prefix}.out/.err`; (exit code, wall seconds, last stderr line)."""
    log_prefix.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(f"{log_prefix}.out", "w") as out, open(f"{log_prefix}.err", "w") as err:
        try:
            code = subprocess.run(cmd, stdout=out, stderr=err, timeout=timeout or None, env=env).returncode
        except subprocess.TimeoutExpired:
            code = -9
    wall = time.time() - start
    tail = last_line(Path(f"{log_prefix}.err").read_text(errors="replace"))
    return code, wall, (f"killed after --run-timeout {timeout:g} s" if code == -9 and timeout else tail)


def score_at_data_rtg(args: Args, run: Run, env_id: str, dataset: str, model, log_dir: Path, logs: Path, env) -> float:
    """`data_rtg_command`'s normalized score (NaN when the run wrote no model or the evaluation failed)."""
    if model is None:
        return float("nan")
    out_dir = log_dir.with_name(f"{log_dir.name}-data-rtg")
    for f in out_dir.rglob("events.out.tfevents.*"):
        f.unlink()
    cmd = data_rtg_command(args, run, env_id, dataset, model, out_dir)
    run_process(cmd, logs / f"{run.method.key}__s{run.seed}-data-rtg", args.run_timeout, env)
    scores = read_scalars(out_dir).get("charts/normalized_score")
    return float(scores[1][-1]) if scores is not None else float("nan")


def main(args: Args) -> Path:
    tasks, methods = preset_runs(args.preset, args.scale)
    if args.env_id or args.dataset:
        if not (args.env_id and args.dataset):
            raise UserError("--env-id and --dataset go together")
        TASKS[args.env_id] = (args.env_id, args.dataset)
        tasks = [args.env_id]
    if args.tasks:
        unknown = set(args.tasks) - set(tasks)
        if unknown:
            raise UserError(f"unknown --tasks {sorted(unknown)} for preset {args.preset}; valid: {', '.join(tasks)}")
        tasks = [t for t in tasks if t in args.tasks]
    if args.methods:
        unknown = set(args.methods) - {m.key for m in methods}
        if unknown:
            raise UserError(
                f"unknown --methods {sorted(unknown)} for preset {args.preset}; valid: {', '.join(m.key for m in methods)}"
            )
        methods = [m for m in methods if m.key in args.methods]
    if not args.seeds or min(args.seeds) < 1 or len(set(args.seeds)) < len(args.seeds):
        raise UserError(f"--seeds must be distinct positive integers, got {list(args.seeds)}")
    if args.checkpoint and len(tasks) != 1:
        raise UserError(f"--checkpoint is for one task; pick one with --tasks ({', '.join(tasks)})")
    if args.checkpoint and len({m.pretrain for m in methods}) > 1:
        raise UserError(f"--checkpoint is one model; preset {args.preset} compares several (pick one kind with --methods)")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UserError(f"--checkpoint {args.checkpoint} is not a file")
    name = args.name or (args.preset if args.scale == "cpu" else f"{args.preset}-paper")
    out_dir, scripts = Path(args.results_dir) / name, Path(args.scripts_dir)
    raw = out_dir / "raw"
    env = {"MINARI_DATASETS_PATH": str((ROOT / ".." / "shared" / "datasets").resolve()), **os.environ}
    threads = args.threads if args.threads is not None else (1 if args.scale == "cpu" else None)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    plan = []  # (task, checkpoint, pretrain command or None, runs), one per task and pretraining
    for task, pretrain in ((t, p) for t in tasks for p in dict.fromkeys(m.pretrain for m in methods)):
        env_id, dataset = TASKS[task]
        flags = [
            "--env-id",
            env_id,
            "--dataset",
            dataset,
            "--seed",
            "1",
            "--eval-every",
            "0",
            "--save-every",
            "0",
            *PRETRAIN_LIKELIHOOD,
            *("--scale", args.scale),
            *pretrain,
        ]
        # Shared by every preset that pretrains with the same flags and format: the file name carries a hash of them.
        tag = hashlib.sha1(" ".join([*flags, f"format {CHECKPOINT_FORMAT_VERSION}"]).encode()).hexdigest()[:8]
        ckpt = Path(args.checkpoint or f"{args.checkpoints_dir}/{env_id}__{dataset.replace('/', '-')}__{args.scale}__{tag}.pt")
        needed = any(m.uses_checkpoint for m in methods)  # IQL alone needs no DT
        pre = (
            None
            if args.checkpoint or not needed
            else [
                sys.executable,
                str(scripts / "pretrain_dt.py"),
                *flags,
                "--checkpoint",
                str(ckpt),
                "--runs-dir",
                str(raw / "runs" / task / "pretrain"),
            ]
        )
        runs = [Run(task, m, seed) for m in methods if m.pretrain == pretrain for seed in args.seeds]
        for r in runs:
            r.cmd = finetune_command(
                args, r.method, env_id, dataset, ckpt, r.seed, raw / "runs" / task / r.method.key / f"s{r.seed}"
            )
        plan.append((task, ckpt, pre, runs))
    if args.dry_run:
        for task, ckpt, pre, runs in plan:
            print(f"# {task}: {TASKS[task]}, checkpoint {ckpt}")
            print(show(pre) if pre else f"# using --checkpoint {ckpt}" if args.checkpoint else "# no DT checkpoint needed")
            for r in runs:
                print(show(r.cmd))
        return out_dir

    budget = ", ".join(
        b
        for b in (
            args.budget_env_steps and f"{args.budget_env_steps} env steps",
            args.budget_iterations and f"{args.budget_iterations} iterations",
            args.budget_seconds and f"{args.budget_seconds:g} s",
        )
        if b
    )
    title = f"{name}: {args.preset} at {args.scale} scale"
    argv = [a for a in sys.argv[1:] if a != "--summarize-only"]
    header = [
        f"- command: `python benchmarks/compare.py {shlex.join(argv)}`" if "compare" in sys.argv[0] else f"- args: `{args}`",
        *(
            f"- {t}: {TASKS[t][0]} on {TASKS[t][1]}; shared checkpoint `{c}`" + (f", made by `{show(p)}`" if p else "")
            for t, c, p, _ in plan
        ),
        f"- seeds: {', '.join(map(str, args.seeds))}; budget per run: {budget or 'none (the scripts own iteration counts)'}",
        "- score: D4RL normalized x100 at the run's last evaluation, by the script's own evaluation; the "
        "pretrained DT row is `grpo_dt.py --num-iterations 0` (GRPO-DT's evaluation); each run's iteration-0 "
        "score is its own script's evaluation of the same checkpoint; IQL uses no checkpoint: it pretrains "
        "itself on the same data for as many updates as the DT, and its iteration 0 is the score after that",
        f"- mean of the last {LATE_WINDOW:.0%}: the mean of every evaluation a run logged in the last {LATE_WINDOW:.0%} of "
        "its logging time (first to last scalar), then mean ± std over seeds; read it rather than one final evaluation",
        "- ± is the std over seeds (np.std, ddof=0); env steps and updates: the last logged `charts/env_steps`, "
        "`charts/grad_updates`, mean over the seeds that finished; wall time: process start to exit",
    ]
    sections = {
        t: {m.key: [r for task, _, _, runs in plan if task == t for r in runs if r.method is m] for m in methods}
        for t in tasks
    }
    paper = PAPER_TABLE1 if args.preset == "table1-cpu" else None
    out_dir.mkdir(parents=True, exist_ok=True)

    def write_outputs():  # after every run, so an interrupted comparison still leaves its table and curves
        shas = {}
        for _, _, _, runs in plan:
            for r in runs:
                if r.script_sha:
                    shas.setdefault(Path(r.cmd[1]).name, set()).add(r.script_sha)
        versions = (
            "- script versions (sha1 of the file at each run's start): "
            + "; ".join(
                f"{k} {', '.join(sorted(v))}" + (" **(changed during the comparison)**" if len(v) > 1 else "")
                for k, v in sorted(shas.items())
            )
            if shas
            else "- script versions: not recorded"
        )
        commits = {}
        for _, _, _, runs in plan:
            for r in runs:
                if r.returncode is not None:
                    commits[r.commit or "not recorded"] = commits.get(r.commit or "not recorded", 0) + 1
        ran_at = "- commit at each run's start: " + (
            "; ".join(f"{c} ({n} run{'s' * (n > 1)})" for c, n in sorted(commits.items())) or "no run yet"
        )
        date = f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        (out_dir / "summary.md").write_text(format_summary(title, header + [versions, ran_at, date], sections, paper))
        plot_curves(sections, out_dir / "curves.png", title)
        plot_bars(sections, out_dir / "bars.png", title)

    total, done = sum(len(p[3]) for p in plan), 0
    for task, ckpt, pre, runs in plan:
        if args.summarize_only:
            pass
        elif pre and ckpt.is_file():
            print(f"[{task}] reusing checkpoint {ckpt} (delete it to pretrain again)", flush=True)
        elif pre:
            print(f"[{task}] pretraining the shared checkpoint: {show(pre)}", flush=True)
            code, wall, tail = run_process(pre, raw / "logs" / task / f"pretrain__{ckpt.stem}", 0, env)
            if code != 0 or not ckpt.is_file():
                raise UserError(f"pretraining for {task} failed (exit {code}: {tail}); see {raw / 'logs' / task}")
            print(f"[{task}] checkpoint {ckpt} in {wall:.0f} s", flush=True)
        for r in runs:
            planned = r.cmd  # a kept record brings back the command it ran with; a rerun runs this one
            log_dir = Path(r.cmd[r.cmd.index("--runs-dir") + 1])
            # exit code, wall time, error, script sha1, score at the data's RTG, commit, command
            record = raw / "logs" / task / f"{r.method.key}__s{r.seed}.json"
            kept = out_dir / "records" / task / f"{r.method.key}__s{r.seed}.json"
            outcome = json.loads(record.read_text()) if record.is_file() else None
            # a local failure redone elsewhere: the kept success wins over the raw record
            redone = outcome and outcome[0] != 0 and kept.is_file() and json.loads(kept.read_text())["returncode"] == 0
            if outcome and not redone:
                r.returncode, r.wall_time, r.error, *rest = outcome
                r.script_sha, r.data_rtg_score, r.commit, ran = (rest + ["", float("nan"), "", ""][len(rest) :])[:4]
                # the command it ran with, never this call's: a summary made with other budget flags keeps it
                ran = ran or (kept.is_file() and json.loads(kept.read_text())["command"])
                r.cmd = [sys.executable, *shlex.split(ran)[1:]] if ran else r.cmd
                r.scalars = read_scalars(log_dir)
                keep_run(r, kept)
            elif kept.is_file():  # run elsewhere: its raw logs are gone (or failed here), its kept record is not
                load_kept(r, kept)
            if args.summarize_only:
                continue
            if r.ok and not args.rerun:
                done += 1
                print(f"[{done}/{total}] {task} {r.method.label} seed {r.seed}: finished earlier, kept", flush=True)
                continue
            r.cmd, r.returncode, r.wall_time, r.error, r.scalars = planned, None, float("nan"), "", {}
            if log_dir.exists():  # a rerun into the same results folder starts clean
                for f in log_dir.rglob("events.out.tfevents.*"):
                    f.unlink()
            script = Path(r.cmd[1])
            r.script_sha = hashlib.sha1(script.read_bytes()).hexdigest()[:10] if script.is_file() else ""
            r.commit = git_commit()
            r.returncode, r.wall_time, tail = run_process(
                r.cmd, raw / "logs" / task / f"{r.method.key}__s{r.seed}", args.run_timeout, env
            )
            r.scalars = read_scalars(log_dir)
            if r.returncode != 0:
                r.error = f"exit {r.returncode}: {tail}"
            if r.ok and r.method.uses_checkpoint:
                model = ckpt if r.method.reference else max(log_dir.rglob(f"{r.method.key}.pt"), default=None)
                r.data_rtg_score = score_at_data_rtg(args, r, *TASKS[task], model, log_dir, raw / "logs" / task, env)
            outcome = [r.returncode, r.wall_time, r.error, r.script_sha, r.data_rtg_score, r.commit, show(r.cmd)]
            record.write_text(json.dumps(outcome))
            keep_run(r, kept)
            done += 1
            status = (
                (
                    f"score {r.last('charts/normalized_score'):.2f} | env steps {fmt(r.last('charts/env_steps'))} | "
                    f"updates {fmt(r.last('charts/grad_updates'))}"
                )
                if r.ok
                else f"FAILED ({r.error or 'no charts/normalized_score logged'})"
            )
            print(f"[{done}/{total}] {task} {r.method.label} seed {r.seed}: {status} | {r.wall_time:.1f} s", flush=True)
            write_outputs()
    write_outputs()
    print(f"wrote {out_dir / 'summary.md'}, {out_dir / 'curves.png'} and {out_dir / 'bars.png'}")
    return out_dir


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
