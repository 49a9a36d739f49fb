"""GRPO-DT: online finetuning of a pretrained Decision Transformer with pure GRPO gradients.

"Online Finetuning Decision Transformers with Pure RL Gradients" (Luo & Zhu), Sec. 3.2, Alg. 1, Eqs. 2-3, App. B.1,
Tables 5-6. Full trajectories conditioned on g_online (no relabeling) give reset points, drawn by softmax of action
variance; G envs reset to the exact same simulator state and DT context roll out L_traj stochastic + L_eval
expected-action steps; group-normalised discounted rewards (Eq. 2) drive the clipped sequence-ratio objective
- beta*KL(pi || pi_ref) + kappa*entropy (Eq. 3).

Example (pretrains the checkpoint first if it is missing):
    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) python grpo_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0
"""

import contextlib
import copy
import ctypes
import functools
import math
import multiprocessing as mp
import os
import pickle
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Independent, Normal, TanhTransform, TransformedDistribution, kl_divergence
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


# ---------------------------------------------------------------- arguments
@dataclass
class Args:
    # ---- shared: args-header (identical in every script; tests/test_shared_blocks.py) ----
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch, env resets and action sampling)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` and deterministic torch algorithms"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    track: bool = False
    """if toggled, log to Weights and Biases (wandb is imported only then)"""
    wandb_project_name: str = "grpo-dt"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """if toggled, record the first evaluation episode of every evaluation to `videos/{run_name}`"""
    runs_dir: str = "runs"
    """TensorBoard root; the run logs to `{runs_dir}/{run_name}`"""
    env_id: str = "Hopper-v4"
    """gymnasium id: Hopper/Walker2d/Ant/HalfCheetah-v4/v5, AdroitHandDoor/Hammer/Pen-v1, AntMaze_UMaze-v4/v5"""
    dataset: str = "medium"
    """a paper short name (medium, medium-replay, random, expert, human, cloned, umaze, umaze-diverse) or a Minari id"""
    dataset_path: Optional[str] = None
    """a D4RL-format HDF5 file (observations, actions, rewards, terminals, timeouts); overrides the Minari lookup"""
    # ---- end shared: args-header ----
    checkpoint: Optional[str] = None
    """pretrained checkpoint; default `checkpoints/{env_id}__{dataset}__s{seed}.pt` (`__cpu` for --model-size cpu)"""
    model_size: Literal["paper", "cpu"] = "paper"
    """size of the DT that pretrain_dt.py makes when the checkpoint is missing"""
    pretrain_extra_args: str = ""
    """extra pretrain_dt.py flags used when the checkpoint is missing, e.g. "--num-updates 2000\""""
    num_iterations: int = 100
    """outer iterations of Algorithm 1 (0: only evaluate the checkpoint)"""
    total_env_steps: int = 0
    """stop after the iteration at which env steps (full + group rollouts, not evaluation) reach this; 0 = no budget"""
    max_seconds: float = 0
    """wall-clock budget in seconds, counted from the start of main (before loading; 0: none); stop after the iteration
    that reaches it"""
    # ---- shared: eval-args (identical in every finetuning DT script; tests/test_shared_blocks.py) ----
    eval_episodes: int = 10
    """deterministic tanh(mean) evaluation episodes (dropout off) at iteration 0 and after each iteration, reset with
    `eval_seeds(seed, n)`"""
    eval_rtg: Optional[float] = None
    """RTG conditioning the evaluation episodes (raw return units); default the checkpoint's `eval_rtg`"""
    eval_context_len: Optional[int] = None
    """DT context of the evaluation episodes; default c_online of Table 6, the rollout context (odt_td3.py: --c-online)"""
    # ---- end shared: eval-args ----
    save_every: int = 5
    """write the run state (atomically) every this many iterations and at the end; 0 = never"""
    save_path: Optional[str] = None
    """where the run state goes; default `{runs_dir}/{run_name}/state.pt`"""
    keep_states: bool = False
    """also keep every saved run state as `state_it{iteration:04d}.pt` beside it, for analysis over a run's history
    (benchmarks/probe_grpo_objective.py)"""
    resume: Optional[str] = None
    """a run state written by --save-every: continue that run bit-exactly (model, optimisers, kappa, buffers, rngs)
    with its own settings; only the RUN_CONTROL flags come from this command"""
    save_model: bool = False
    """at the end, also write the finetuned DT as a checkpoint to `{runs_dir}/{run_name}/{exp_name}.pt`"""
    num_workers: int = 0
    """step the envs in this many worker processes, pipelined with the policy (it acts for one stage's members while
    the other stages step; the same result as in-process); 0 steps them in this process"""
    pipeline_stages: int = 2
    """with --num-workers, the workers form this many pipeline stages, the policy acting for one while the others step
    (0: one per worker, 5.4x slower than 2 at 16 workers with a GPU policy: README, Rollout speed); the same result
    with any number"""
    cuda_graphs: bool = True
    """with the policy on CUDA, each pipeline stage's policy step is captured once per rollout as a CUDA graph and
    replayed (finished members computed and ignored), instead of a hundred-odd kernel launches per step; no effect on
    the CPU. The same algorithm; GPU rounding may differ in the last bits, as between any two batch sizes there"""
    update_chunk_steps: int = 16384
    """memory, not the algorithm: a gradient update runs its n_batch sub-trajectories in chunks of at most this many
    policy steps, whose gradients add up to the whole batch's (--full-trajectory's 256 x 1000 steps would need ~20 GB
    at once; Table 6's 256 x 15 is one chunk); 0 = one chunk"""
    torch_threads: int = 1
    """CPU threads of torch; 1 is fastest for batched small-model rollouts on a busy machine (0 = torch's default)"""
    max_episode_steps: Optional[int] = None
    """override the env's time limit (tests and quick runs); default the env's own (1000 MuJoCo, 200 door, 700 AntMaze)"""

    # Table 6 (None = the preset of the env family and dataset, see `apply_presets`)
    n_batch: Optional[int] = None
    """sub-trajectories per gradient update (Table 6 n_batch: 256 MuJoCo/AntMaze, 512 Adroit)"""
    c_online: Optional[int] = None
    """DT context length in finetuning, rollouts and evaluation (Table 6: 1, 5 for hammer and umaze-diverse)"""
    g_online: Optional[float] = None
    """initial RTG of the exploration rollouts, raw reward units (Table 6, e.g. 7200 Hopper)"""
    subtraj_len: Optional[int] = None
    """L_traj: stochastic steps per sub-trajectory, the part that is optimised (Table 6: 15 MuJoCo, 10, 3 pen)"""
    eval_len: Optional[int] = None
    """L_eval: extra tanh(mean) steps that only score a sub-trajectory (Table 6: 400 Hopper/Walker2d, 200, 100, 30)"""
    gamma: Optional[float] = None
    """discount of the sub-trajectory reward over L_traj + L_eval steps (Table 6: 0.995 MuJoCo, 0.99 Adroit, 1 AntMaze)"""
    std_scale: Optional[float] = None
    """GRPO-DT's policy is the DT's squashed Gaussian with sigma times this, in the sampled steps and in every log-prob,
    ratio, KL and entropy (evaluation and L_eval use tanh(mean) either way); default 0.25 on MuJoCo and Adroit with
    --narrow-exploration, else 1 (the paper's)"""
    narrow_exploration: bool = True
    """MuJoCo and Adroit (not AntMaze), a departure from the paper (README, "GRPO-DT's rise and decline"): explore
    with sigma x 0.25 and clip at 2x Table 6's epsilon, so that the sampled policy GRPO-DT improves is close to
    tanh(mean), the policy that is evaluated (Hopper, 3 seeds x 40 iterations: last-5 mean +18.1 over the start,
    against -8.6 with the paper's values, which rise and collapse; Door, 4 seeds: +4.5 against -2.2);
    --no-narrow-exploration is the paper; --std-scale / --clip-coef given win"""
    score_to_end: bool = False
    """score sub-trajectories to the end of their episode, undiscounted (L_eval = the time limit, gamma = 1) instead of
    Table 6's L_eval and gamma; an explicit --eval-len or --gamma wins. An experiment arm of issue #12 (it did not hold
    Hopper's gain either)"""
    clip_coef: Optional[float] = None
    """epsilon of the clipped ratio in Eq. 3 (Table 6: 0.2 or 0.3)"""
    delta_r: Optional[float] = None
    """drop group members whose reward is within this of the group mean (Table 6 Delta_r)"""
    learning_rate: Optional[float] = None
    """LAMB learning rate of the policy (Table 6: 5e-5 MuJoCo/AntMaze, 3e-5 Adroit)"""
    kappa_initial: Optional[float] = None
    """initial entropy dual variable kappa (Table 6)"""

    # Appendix B.1 / Table 5
    full_trajs_per_iter: Optional[int] = None
    """full trajectories rolled out per iteration (B.1: 1, 5 for Adroit)"""
    full_buffer_size: int = 32
    """FIFO capacity of the full-trajectory buffer (B.1)"""
    trajs_per_iter: int = 16
    """full trajectories drawn from the buffer per iteration, in proportion to length (B.1)"""
    reset_points: int = 4
    """K: reset points per drawn trajectory (B.1)"""
    group_size: int = 8
    """G: sub-trajectories per reset point (B.1)"""
    subtraj_buffer_size: int = 2048
    """FIFO capacity of the sub-trajectory buffer (B.1)"""
    updates_per_iter: int = 8
    """gradient updates per iteration, each on n_batch sub-trajectories drawn uniformly from the buffer"""
    kl_coef: float = 1e-3
    """beta of the KL(pi || pi_ref) penalty (Table 5)"""
    ref_update_every: int = 4
    """copy the policy into pi_ref every this many updates (Section 2)"""
    target_entropy: Optional[float] = None
    """entropy lower bound rho; default -dim(A) (Table 5)"""
    kappa_lr: float = 1e-4
    """Adam learning rate of log kappa (ODT's temperature learning rate)"""
    weight_decay: float = 1e-4
    """LAMB weight decay (Table 5)"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip (Table 5)"""

    # Ablations (Figs. 1, 2, 4c/d); the defaults are the paper's method
    relabel: bool = False
    """ablation (Fig. 1): hindsight relabeling; RTG tokens are replaced by achieved returns at training time"""
    full_trajectory: bool = False
    """ablation (Fig. 2a): vanilla GRPO on whole episodes from the initial state, undiscounted, no L_eval"""
    consistent_reset: bool = True
    """the members of a group share their reset point; --no-consistent-reset is the ablation of Fig. 2b"""
    ratio: Literal["sequence", "token", "geometric"] = "sequence"
    """Eq. 3's ratio: of whole sub-trajectories; ablations: per-step ratios (Fig. 2c), exp(mean log-ratio) (GSPO, Fig. 2e)"""
    reset_sampling: Literal["variance", "uniform"] = "variance"
    """reset points by softmax of action variance; uniform over steps is the ablation of Fig. 2d"""
    full_rollout_actions: Literal["sampled", "mean"] = "sampled"
    """actions of the full trajectories that supply reset points (Alg. 1 line 2): sampled (the paper) or tanh(mean),
    whose episodes reach the steady gait that noisy sampled ones fall before (an experiment of issue #12)"""


# Flags a resumed run takes from its new command line; every other one comes from the saved run (resumed_args).
RUN_CONTROL = (
    "num_iterations total_env_steps max_seconds eval_episodes save_every save_path save_model resume runs_dir cuda track "
    "wandb_project_name wandb_entity capture_video keep_states num_workers pipeline_stages torch_threads update_chunk_steps "
    "cuda_graphs"
).split()


# Table 6: n_batch, c_online, g_online, L_traj, L_eval, gamma, eps, Delta_r, lr, kappa_initial.
PRESET_FIELDS = "n_batch c_online g_online subtraj_len eval_len gamma clip_coef delta_r learning_rate kappa_initial".split()
TABLE6 = {
    ("hopper", "medium"): (256, 1, 7200, 15, 400, 0.995, 0.2, 2.0, 5e-5, 0.20),
    ("hopper", "random"): (256, 1, 7200, 15, 400, 0.995, 0.2, 2.0, 5e-5, 0.20),
    ("walker2d", "medium"): (256, 1, 10000, 15, 400, 0.995, 0.3, 2.0, 5e-5, 0.04),
    ("walker2d", "random"): (256, 1, 10000, 15, 400, 0.995, 0.3, 2.0, 5e-5, 0.20),
    ("ant", "medium"): (256, 1, 12000, 15, 200, 0.995, 0.3, 2.0, 5e-5, 0.04),
    ("ant", "random"): (256, 1, 12000, 15, 200, 0.995, 0.3, 2.0, 5e-5, 0.20),
    # Not in the paper: HalfCheetah takes the Walker2d-M row with g_online = 2x ODT's eval RTG 6000.
    ("halfcheetah", "medium"): (256, 1, 12000, 15, 400, 0.995, 0.3, 2.0, 5e-5, 0.04),
    ("door", "cloned"): (512, 1, 3000, 10, 100, 0.99, 0.3, 0.5, 3e-5, 0.10),
    ("door", "human"): (512, 1, 3000, 10, 100, 0.99, 0.3, 0.4, 3e-5, 0.04),
    ("pen", "cloned"): (512, 1, 6000, 3, 30, 0.99, 0.3, 0.0, 3e-5, 0.02),
    ("pen", "human"): (512, 1, 6000, 3, 30, 0.99, 0.3, 0.0, 3e-5, 0.02),
    ("hammer", "cloned"): (512, 5, 4000, 10, 100, 0.99, 0.3, 0.0, 3e-5, 0.05),
    ("hammer", "human"): (512, 5, 4000, 10, 100, 0.99, 0.3, 0.8, 3e-5, 0.05),
    ("antmaze", "umaze"): (256, 1, 2, 10, 200, 1.0, 0.2, 0.0, 5e-5, 0.05),
    ("antmaze", "umaze-diverse"): (256, 5, 2, 10, 200, 1.0, 0.2, 0.0, 5e-5, 0.05),
}
DEFAULT_ROW = {"mujoco": "medium", "adroit": "human", "antmaze": "umaze"}


def apply_presets(args: Args, family: str, key: str) -> str:
    """Fill every unset Table 6 / B.1 field from the row for (env, dataset), and --std-scale (--narrow-exploration);
    returns the row name. The dataset's last part picks the row (medium-replay -> medium), else the family's medium,
    human or umaze row."""
    name = re.sub(r"-v\d+$", "", args.dataset.rsplit("/", 1)[-1])
    name = {"medium-replay": "medium"}.get(name, name)  # the table's rows are "M/MR"
    row = name if (key, name) in TABLE6 else DEFAULT_ROW[family]
    narrow = args.narrow_exploration and family in ("mujoco", "adroit")
    for field, value in zip(PRESET_FIELDS, TABLE6[(key, row)]):
        if getattr(args, field) is None:
            setattr(args, field, 2 * value if narrow and field == "clip_coef" else value)
    if args.std_scale is None:
        args.std_scale = 0.25 if narrow else 1.0
    if args.full_trajs_per_iter is None:
        args.full_trajs_per_iter = 5 if family == "adroit" else 1
    return row


# ---------------------------------------------------------------- envs and exact resets
# ---- shared: envs (identical in every script; tests/test_shared_blocks.py) ----
class UserError(Exception):
    """Bad input: printed as one line, never as a traceback."""


MUJOCO_ENVS = {"Hopper": "hopper", "Walker2d": "walker2d", "Ant": "ant", "HalfCheetah": "halfcheetah"}
ADROIT_ENVS = {"AdroitHandDoor": "door", "AdroitHandHammer": "hammer", "AdroitHandPen": "pen"}
SUPPORTED = "MuJoCo Hopper/Walker2d/Ant/HalfCheetah-v4|v5, Adroit AdroitHandDoor/Hammer/Pen-v1, AntMaze_UMaze-v4|v5"


def env_family(env_id: str) -> tuple[str, str]:
    """(family, key) for a supported id, e.g. ("mujoco", "hopper"); a one-line error otherwise."""
    name, _, version = env_id.rpartition("-")
    if name in MUJOCO_ENVS and version in ("v4", "v5"):
        return "mujoco", MUJOCO_ENVS[name]
    if name in ADROIT_ENVS and version == "v1":
        return "adroit", ADROIT_ENVS[name]
    if name == "AntMaze_UMaze" and version in ("v4", "v5"):
        return "antmaze", "antmaze"
    raise UserError(f"unknown --env-id {env_id!r}; supported: {SUPPORTED}")


def flatten_antmaze_obs(obs: dict) -> np.ndarray:
    """AntMaze state vector: `observation` (27) then `desired_goal` (2); `achieved_goal` is left out."""
    return np.concatenate([obs["observation"], obs["desired_goal"]], axis=-1)


def make_env(env_id: str, **kwargs) -> gym.Env:
    """`gym.make`, registering gymnasium-robotics for Adroit and AntMaze, with AntMaze's dict observation flattened."""
    family, _ = env_family(env_id)
    if family != "mujoco":
        import gymnasium_robotics  # registers Adroit and AntMaze; only needed for them

        gym.register_envs(gymnasium_robotics)
    env = gym.make(env_id, **kwargs)
    if family == "antmaze":
        inner = env.observation_space
        dim = inner["observation"].shape[0] + inner["desired_goal"].shape[0]
        space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float64)
        env = gym.wrappers.TransformObservation(env, flatten_antmaze_obs, space)
    return env


def fix_malloc_mmap_threshold():
    """Stop glibc's RSS creep on CPU: after large frees it raises its mmap threshold, and each update's
    activations then fragment the heap (the 4x512 DT grew to 14 GB in 22 updates). Fixed thresholds stop it
    (RSS 1.3-2.8 GB, peak 3.4, over 25 updates). They are high enough that a rollout's activations (2 MB at 512
    members) are reused from the heap, not mmapped and page-faulted afresh by every op: at an mmap threshold of
    128 KB the rollout forward took 31 ms, here 18."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD: tensors above 8 MB go to mmap and back to the OS when freed
            libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: keep up to 64 MB of free heap instead of returning it
        except OSError:  # not glibc
            pass


def eval_seeds(seed: int, n: int) -> np.ndarray:
    """Evaluation reset seeds of run seed `seed`: disjoint across run seeds, the same at every evaluation of a run."""
    return 100_000 * seed + np.arange(n)


def train_seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    """Reset seeds of training episodes from the run's generator: uniform over the integers below 2**31 whose last
    five digits are at least 50_000, so never an `eval_seeds` value (100_000 * s + i, i < 50_000) of any run seed s."""
    x = rng.integers(2**31 // 100_000 * 50_000, size=n)
    return x // 50_000 * 100_000 + 50_000 + x % 50_000


# ---- end shared: envs ----


STATE_SPEC = mujoco.mjtState.mjSTATE_INTEGRATION  # everything mj_step reads: qpos, qvel, act, warm start, ctrl, time, ...


def sim_of(env):
    """The MujocoEnv that owns the MjData (AntMaze wraps an inner AntEnv)."""
    u = env.unwrapped
    return u.ant_env if hasattr(u, "ant_env") else u


def time_limit(env) -> gym.wrappers.TimeLimit:
    while not isinstance(env, gym.wrappers.TimeLimit):
        env = env.env
    return env


def episode_params(env, family: str) -> dict:
    """Per-episode parameters that live outside MjData (door/board position, pen target, maze goal)."""
    u = env.unwrapped
    if family == "adroit":  # hammer's `target_pos` is rejected by its own set_env_state (gymnasium-robotics 1.4.2)
        return {k: v for k, v in u.get_env_state().items() if k != "target_pos"}
    return {"goal": u.goal.copy()} if family == "antmaze" else {}


def reset_to_state(env, family: str, params: dict, prev_state, state, elapsed: int):
    """Put `env` exactly where a recorded trajectory was before step h: episode params, MjData, TimeLimit counter.

    qpos/qvel are not enough: after `mj_step` derived fields (xpos, contacts) describe the state before the last
    integration and Ant's reward reads them. So we set step h-1's integration state and re-run its frame-skip
    physics with step h's ctrl: every MjData field comes back bit for bit from a 58-352 double vector (a full
    MjData copy per step would be a ~10 MB arena). At h = 0 (`prev_state` None) the env was just reset.
    """
    u, sim = env.unwrapped, sim_of(env)
    if family == "adroit":
        u.set_env_state(params)
    elif family == "antmaze":
        u.goal = params["goal"].copy()
        u.update_target_site_pos()
    mujoco.mj_setState(sim.model, sim.data, state, STATE_SPEC)
    if prev_state is None:
        mujoco.mj_forward(sim.model, sim.data)
    else:
        ctrl = sim.data.ctrl.copy()
        mujoco.mj_setState(sim.model, sim.data, prev_state, STATE_SPEC)
        sim.do_simulation(ctrl, sim.frame_skip)
    time_limit(env)._elapsed_steps = int(elapsed)


class MujocoStep:
    """gymnasium's `env.step` of MuJoCo v4 envs (Hopper, Walker2d, HalfCheetah, Ant without contact forces) for many
    members at once, bit for bit: per member the same `ctrl`, `mj_step` x frame_skip and `mj_rnePostConstraint`
    (so MjData ends up identical), then the v4 observation, reward and termination formulas in numpy over all members
    (same operations, same dtypes), and the TimeLimit counter. It skips the wrapper stack (OrderEnforcing and
    PassiveEnvChecker do nothing after the first step) and each env's Python reward code. Adroit, AntMaze and v5 envs
    keep gymnasium's step: tests/test_fast_step.py checks both against plain `env.step`."""

    FAMILIES = {"Hopper-v4": "hopper", "Walker2d-v4": "walker2d", "HalfCheetah-v4": "halfcheetah", "Ant-v4": "ant"}

    @classmethod
    def supports(cls, env_id: str) -> bool:
        return env_id in cls.FAMILIES

    def __init__(self, envs: list):
        u = envs[0].unwrapped
        self.key, self.limits = self.FAMILIES[u.spec.id], [time_limit(e) for e in envs]
        self.sims = [(e.unwrapped.model, e.unwrapped.data) for e in envs]
        self.views = [(d.qpos, d.qvel, d.ctrl, d.xipos) for _, d in self.sims]  # numpy views of each MjData, made once
        self.frame_skip, self.dt, self.u = u.frame_skip, u.dt, u
        self.torso = u.model.body("torso").id if self.key == "ant" else None
        if self.key == "ant" and u._use_contact_forces:
            raise ValueError("MujocoStep does not compute Ant's contact forces; use gymnasium's step")

    def step(self, idx, actions):
        n, m0 = len(idx), self.sims[0][0]
        qpos, qvel, x0 = np.empty((n, m0.nq)), np.empty((n, m0.nv)), np.empty((n, 2))
        elapsed = np.empty(n, np.int64)
        for j, i in enumerate(idx):
            model, data = self.sims[i]
            qp, qv, ctrl, xipos = self.views[i]
            x0[j] = xipos[self.torso, :2] if self.torso is not None else qp[0]
            ctrl[:] = actions[j]
            mujoco.mj_step(model, data, nstep=self.frame_skip)
            mujoco.mj_rnePostConstraint(model, data)
            qpos[j], qvel[j] = qp, qv
            if self.torso is not None:
                x0[j] = (xipos[self.torso, :2] - x0[j]) / self.dt
            limit = self.limits[i]
            limit._elapsed_steps += 1
            elapsed[j] = limit._elapsed_steps - limit._max_episode_steps
        ctrl_cost = self.u._ctrl_cost_weight * np.sum(np.square(actions), axis=1)  # in the actions' dtype, as gymnasium
        obs, reward, healthy = self.formulas(qpos, qvel, x0, ctrl_cost)
        terminated = ~healthy if getattr(self.u, "_terminate_when_unhealthy", False) else np.zeros(n, bool)
        return obs, reward, terminated, elapsed >= 0

    def formulas(self, qpos, qvel, x0, ctrl_cost):
        """(obs, reward, healthy) per member after the step: hopper_v4.py, walker2d_v4.py, half_cheetah_v4.py, ant_v4.py."""
        u, key = self.u, self.key
        skip = (2 if key == "ant" else 1) if u._exclude_current_positions_from_observation else 0
        if key == "ant":  # x0 holds the torso's xy velocity (its COM before the last substep's integration)
            state = np.concatenate([qpos, qvel], 1)
            healthy = np.isfinite(state).all(1) & (u._healthy_z_range[0] <= qpos[:, 2]) & (qpos[:, 2] <= u._healthy_z_range[1])
            alive = (healthy | u._terminate_when_unhealthy).astype(np.float64) * u._healthy_reward
            return np.concatenate([qpos[:, skip:], qvel], 1), (x0[:, 0] + alive) - ctrl_cost, healthy
        forward = u._forward_reward_weight * ((qpos[:, 0] - x0[:, 0]) / self.dt)
        if key == "halfcheetah":
            return np.concatenate([qpos[:, skip:], qvel], 1), forward - ctrl_cost, np.ones(len(qpos), bool)
        z, angle = qpos[:, 1], qpos[:, 2]
        healthy = (u._healthy_z_range[0] < z) & (z < u._healthy_z_range[1])
        healthy &= (u._healthy_angle_range[0] < angle) & (angle < u._healthy_angle_range[1])
        if key == "hopper":
            state = np.concatenate([qpos, qvel], 1)[:, 2:]
            healthy &= ((u._healthy_state_range[0] < state) & (state < u._healthy_state_range[1])).all(1)
        alive = (healthy | u._terminate_when_unhealthy).astype(np.float64) * u._healthy_reward
        obs = np.concatenate([qpos[:, skip:], np.clip(qvel, -10, 10)], 1)
        return obs, (forward + alive) - ctrl_cost, healthy


class Envs:
    """Envs in this process; methods take member indices and return tuples of per-member arrays."""

    def __init__(self, env_id: str, n: int, max_episode_steps: Optional[int] = None, video_dir: Optional[str] = None):
        self.family = env_family(env_id)[0]
        kw = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
        self.envs = [make_env(env_id, **kw) for _ in range(n)]
        if video_dir:
            self.envs[0] = gym.wrappers.RecordVideo(make_env(env_id, render_mode="rgb_array", **kw), video_dir)
        for e in self.envs:
            e.reset(seed=0)  # gymnasium's OrderEnforcing wants a reset before the first step
        self.state_size = mujoco.mj_stateSize(sim_of(self.envs[0]).model, STATE_SPEC)
        self.fast = MujocoStep(self.envs) if MujocoStep.supports(env_id) and not video_dir else None

    def reset(self, idx, seeds):
        obs = np.stack([self.envs[i].reset(seed=int(s))[0] for i, s in zip(idx, seeds)])
        params = np.empty(len(idx), object)
        params[:] = [episode_params(self.envs[i], self.family) for i in idx]
        return obs, params

    def step(self, idx, actions):
        if self.fast:
            return self.fast.step(idx, actions)
        obs, rew, term, trunc = zip(*(self.envs[i].step(a)[:4] for i, a in zip(idx, actions)))
        return np.stack(obs), np.array(rew, np.float64), np.array(term), np.array(trunc)

    def get_states(self, idx):
        out = np.empty((len(idx), self.state_size))
        for j, i in enumerate(idx):
            mujoco.mj_getState(sim_of(self.envs[i]).model, sim_of(self.envs[i]).data, out[j], STATE_SPEC)
        return out, np.array([time_limit(self.envs[i])._elapsed_steps for i in idx])

    def restore(self, idx, params, prev_states, states, elapsed):
        for j, i in enumerate(idx):
            reset_to_state(self.envs[i], self.family, params[j], prev_states[j], states[j], elapsed[j])
        return self.get_states(idx)

    def close(self):
        for e in self.envs:
            e.close()


STEP_OUT = ("obs", "reward", "terminated", "truncated")
STEP, STOP = b"S", b"Q"  # worker messages that are not pickles (a pickle starts with its protocol byte, 0x80)


def env_worker(conn, env_id, n, workers, kwargs, shared):
    """Serve `Envs` calls for n members (member i is this worker's env i // workers); a step reads its actions from and
    writes its results to `shared` arrays (indexed by member, no pickling), the pipe carries only the member indices."""
    envs, arrays = (
        Envs(env_id, n, **kwargs),
        {k: np.frombuffer(raw, dtype).reshape(shape) for k, (raw, dtype, shape) in shared.items()},
    )
    while (raw := conn.recv_bytes()) != STOP:
        if raw[:1] == STEP:  # a step: its action dtype's code, then the member indices as raw int64 (no pickling)
            idx = np.frombuffer(raw, np.int64, offset=8)
            actions = arrays["actions"][idx].astype(np.dtype(raw[1:2].decode()))
            for k, v in zip(STEP_OUT, envs.step(idx // workers, actions)):
                arrays[k][idx] = v
            conn.send_bytes(b"")
        else:
            method, args = pickle.loads(raw)
            conn.send(getattr(envs, method)(*args))
    envs.close()


class EnvPool:
    """`Envs` in this process (workers=0) or dealt over worker processes (member i to worker i % workers), one pipe
    round trip per call and worker; `seconds` adds up the time spent in env calls. Dealt, not sliced: a group's members
    share a reset point and tend to finish together, so contiguous slices leave some workers busy and others idle
    while each lockstep step waits for the busiest (README, Rollout speed). (Not AsyncVectorEnv: it steps every env
    and autoresets, so it cannot mask finished members or restore per env.)"""

    def __init__(self, env_id: str, n: int, workers: int = 0, stages: int = 0, **kwargs):
        self.local, self.seconds, self.conns, self.procs = None if workers else Envs(env_id, n, **kwargs), 0.0, [], []
        self.worker_of = np.arange(n) % max(workers, 1)
        # the rollout's pipeline stages: contiguous groups of workers (0 or more than the workers: one per worker)
        self.n_stages = min(stages, workers) if stages else workers
        self.stage_of = (np.arange(workers) * self.n_stages // max(workers, 1))[self.worker_of] if workers else None
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        shared, self.arrays = {}, {}
        if workers:  # step arguments and results live in shared memory, one row per member
            probe = make_env(env_id)
            S, A, obs_dtype = probe.observation_space.shape[0], probe.action_space.shape[0], probe.observation_space.dtype
            probe.close()
            spec = {"actions": (np.float64, (n, A)), "obs": (obs_dtype, (n, S)), "reward": (np.float64, (n,))}
            spec.update(terminated=(np.bool_, (n,)), truncated=(np.bool_, (n,)))
            for k, (dtype, shape) in spec.items():
                raw = ctx.RawArray("b", int(np.prod(shape)) * np.dtype(dtype).itemsize)
                shared[k], self.arrays[k] = (raw, dtype, shape), np.frombuffer(raw, dtype).reshape(shape)
        for w in range(workers):
            parent, child = ctx.Pipe()
            size = int((self.worker_of == w).sum())
            self.procs.append(ctx.Process(target=env_worker, args=(child, env_id, size, workers, kwargs, shared), daemon=True))
            self.procs[-1].start()
            self.conns.append(parent)

    def step(self, idx, actions):
        return self.step_recv(self.step_send(idx, actions))

    def step_send(self, idx, actions):
        """Start `Envs.step` over the members `idx` (with workers through the shared arrays, actions exactly, in
        float64) and return a ticket for `step_recv`; while it runs, the caller may act for other workers' members."""
        if self.local:
            return self.call("step", idx, actions)
        tic, idx, actions, sent = time.perf_counter(), np.asarray(idx), np.asarray(actions), []
        self.arrays["actions"][idx] = actions
        owner = self.worker_of[idx]
        for w, conn in enumerate(self.conns):
            sel = idx[owner == w]
            if len(sel):
                conn.send_bytes(STEP + actions.dtype.char.encode().ljust(7) + sel.astype(np.int64).tobytes())
                sent.append(conn)
        self.seconds += time.perf_counter() - tic
        return idx, sent

    def step_recv(self, ticket):
        """(obs, reward, terminated, truncated) of the step `ticket` started."""
        if self.local:
            return ticket
        tic, (idx, sent) = time.perf_counter(), ticket
        for conn in sent:
            conn.recv_bytes()
        self.seconds += time.perf_counter() - tic
        return tuple(self.arrays[k][idx] for k in STEP_OUT)

    def stages(self, idx) -> list:
        """Positions in `idx` grouped by the stage of workers that holds them (one group in-process): the rollout's
        pipeline stages."""
        if self.local:
            return [np.arange(len(idx))]
        stage = self.stage_of[np.asarray(idx, dtype=int)]
        return [g for g in (np.flatnonzero(stage == s) for s in range(self.n_stages)) if len(g)]

    def call(self, method, idx, *args):
        tic, idx, sent, parts = time.perf_counter(), np.asarray(idx), [], []
        if self.local:
            parts.append((np.arange(len(idx)), getattr(self.local, method)(idx, *args)))
        owner = self.worker_of[idx] if self.conns else None
        for w, conn in enumerate(self.conns):
            sel = np.flatnonzero(owner == w)
            if len(sel):
                conn.send((method, (idx[sel] // len(self.conns), *(np.asarray(a)[sel] for a in args))))
                sent.append((sel, conn))
        parts += [(sel, conn.recv()) for sel, conn in sent]
        back = np.argsort(np.concatenate([sel for sel, _ in parts]))  # worker order -> caller order
        self.seconds += time.perf_counter() - tic
        return tuple(np.concatenate([p[k] for _, p in parts])[back] for k in range(len(parts[0][1])))

    def __getattr__(self, method):
        return functools.partial(self.call, method)

    def close(self):
        for conn, proc in zip(self.conns, self.procs):
            conn.send_bytes(STOP)
            proc.join(timeout=5)
        if self.local:
            self.local.close()


# ---------------------------------------------------------------- model
# ---- shared: model (identical in every DT script; tests/test_shared_blocks.py) ----
CHECKPOINT_FORMAT_VERSION = 1


class Block(nn.Module):
    """Pre-LayerNorm transformer block; attention through `scaled_dot_product_attention`."""

    def __init__(self, embed_dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim), nn.Dropout(dropout)
        )
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, attn_mask):
        B, L, E = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, E // self.n_heads).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, E)))
        return x + self.mlp(self.ln2(x))


class DecisionTransformer(nn.Module):
    """Tokens (RTG_t, s_t, a_t) per step, each with its own linear embedding and no positional embedding (ODT).

    The output at s_t parameterises a diagonal Gaussian in pre-tanh space; the action is tanh of a
    sample (squashed Gaussian). Left padding is masked out of attention.
    """

    def __init__(
        self, state_dim, act_dim, embed_dim=512, n_layers=4, n_heads=4, dropout=0.1, log_std_min=-5.0, log_std_max=2.0
    ):
        super().__init__()
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        self.embed_rtg = nn.Linear(1, embed_dim)
        self.embed_state = nn.Linear(state_dim, embed_dim)
        self.embed_action = nn.Linear(act_dim, embed_dim)
        self.embed_ln = nn.LayerNorm(embed_dim)
        self.embed_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(embed_dim, n_heads, dropout) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(embed_dim)
        self.mean_head = nn.Linear(embed_dim, act_dim)
        self.log_std_head = nn.Linear(embed_dim, act_dim)

    def forward(self, rtg, states, actions, pad_mask):
        """rtg (B,T,1), states (B,T,S), actions (B,T,A), pad_mask (B,T) True where real -> mean, log_std (B,T,A)."""
        B, T, _ = states.shape
        tokens = torch.stack([self.embed_rtg(rtg), self.embed_state(states), self.embed_action(actions)], dim=2)
        x = self.embed_drop(self.embed_ln(tokens.reshape(B, 3 * T, -1)))
        real = pad_mask.repeat_interleave(3, dim=1)  # (B, 3T)
        causal = torch.ones(3 * T, 3 * T, dtype=torch.bool, device=x.device).tril()
        # Keys must be real; every token may see itself so a padded query's row is never empty (no NaN).
        mask = (causal & real[:, None, :]) | torch.eye(3 * T, dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, mask[:, None])
        h = self.ln_f(x).view(B, T, 3, -1)[:, :, 1]  # the state token predicts a_t
        log_std = torch.tanh(self.log_std_head(h))
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (log_std + 1)
        return self.mean_head(h), log_std


def squashed_gaussian(mean, log_std):
    """tanh(N(mean, exp(log_std))) with independent action dims: log_prob sums over them.

    No argument validation: it costs time every step, and a NaN must reach the loss's finiteness check.
    """
    base = Normal(mean, log_std.exp(), validate_args=False)
    return Independent(
        TransformedDistribution(base, [TanhTransform(cache_size=1)], validate_args=False), 1, validate_args=False
    )


def action_log_prob(mean, log_std, actions, margin: float, censor_bound: Optional[float] = None):
    """log pi(a) of given actions under the squashed Gaussian, actions clamped to +-(1 - margin) so atanh is finite.

    With `censor_bound` b, an action dimension on +-1 (behaviour clipped to the bound) is scored as the point mass it
    is: log P(tanh(u) beyond +-b) = log Phi(+-(mean -+ atanh b) / sigma), a censored likelihood, instead of the density
    at the clamp point (atanh(1 - 1e-6) = 7.25); interior dimensions keep the density. The one definition of an
    action's log-prob: pretraining's NLL uses it, and so does every finetuning script that scores actions it did not
    sample from a known pre-tanh value (with the checkpoint's `action_margin` and `censor_bound`)."""
    clamped = actions.clamp(-1 + margin, 1 - margin)
    if censor_bound is None:
        return squashed_gaussian(mean, log_std).log_prob(clamped)
    density = squashed_gaussian(mean, log_std).base_dist.log_prob(clamped)  # per dimension
    edge, std = float(np.arctanh(censor_bound)), log_std.exp()
    upper, lower = torch.special.log_ndtr((mean - edge) / std), torch.special.log_ndtr((-edge - mean) / std)
    on_bound = 1 - 1e-6  # clipped float32 data hold exactly +-1
    return torch.where(actions >= on_bound, upper, torch.where(actions <= -on_bound, lower, density)).sum(-1)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019): Adam's step, rescaled per tensor by the trust ratio ||w|| / ||step||."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                state["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = state["m"] / (1 - b1 ** state["step"])
                v_hat = state["v"] / (1 - b2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * p
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * trust, alpha=-lr)


# ---- end shared: model ----


# ---- shared: checkpoint (identical in every DT script; tests/test_shared_blocks.py) ----
MODEL_SIZES = {
    # Table 5's DT with ODT's pretraining schedule (meant for a GPU)
    "paper": dict(
        embed_dim=512,
        n_layers=4,
        n_heads=4,
        batch_size=256,
        context_len=None,
        learning_rate=1e-4,
        warmup_updates=1000,
        num_updates=5000,
    ),
    # the README's CPU config: a 128x2 DT that pretrains in ~10 minutes on one core
    "cpu": dict(
        embed_dim=128,
        n_layers=2,
        n_heads=1,
        batch_size=32,
        context_len=10,
        learning_rate=1e-3,
        warmup_updates=150,
        num_updates=3000,
    ),
}


def default_checkpoint_path(env_id: str, dataset: str, seed: int, model_size: str = "paper") -> Path:
    """Where pretrain_dt.py writes and every finetuning script looks first:
    checkpoints/{env_id}__{dataset with / -> -}__s{seed}.pt, with `__cpu` before `.pt` for --model-size cpu."""
    suffix = "" if model_size == "paper" else f"__{model_size}"
    return Path("checkpoints") / f"{env_id}__{dataset.replace('/', '-')}__s{seed}{suffix}.pt"


# ---- end shared: checkpoint ----


# ---- shared: load-checkpoint (identical in every finetuning DT script; tests/test_shared_blocks.py) ----


def load_model(path, device="cpu", dropout: float = 0.0):
    """(DT, checkpoint dict) from a pretrain_dt.py or finetuned checkpoint; dropout is off in finetuning (Table 5)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"{path} is not a format-{CHECKPOINT_FORMAT_VERSION} pretrain_dt.py checkpoint")
    config = {k: v for k, v in ckpt["model_config"].items() if k not in ("activation", "c_offline")}
    model = DecisionTransformer(**{**config, "dropout": dropout})
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device), ckpt


def ensure_checkpoint(args) -> Path:
    """The pretrained checkpoint's path; runs pretrain_dt.py in a subprocess first if the file is missing. A file at
    the default path from before pretraining's censored likelihood became the default (it has no `censor_bound`) is
    not reused silently: the README's finetuning results start from the new checkpoint."""
    path = Path(args.checkpoint or default_checkpoint_path(args.env_id, args.dataset, args.seed, args.model_size))
    if path.exists():
        if not args.checkpoint and "censor_bound" not in torch.load(path, map_location="cpu", weights_only=False):
            raise UserError(
                f"{path} predates pretrain_dt.py's default --censor-bound 0.99 (it scores actions on the bounds with "
                f"ODT's density): delete it to pretrain again, or pass --checkpoint {path} to finetune it as it is"
            )
        return path
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent / "pretrain_dt.py"),
        "--env-id",
        args.env_id,
        "--dataset",
        args.dataset,
        "--seed",
        str(args.seed),
        "--model-size",
        args.model_size,
        "--checkpoint",
        str(path),
    ]
    cmd += (["--dataset-path", args.dataset_path] if args.dataset_path else []) + shlex.split(args.pretrain_extra_args)
    print(f"checkpoint {path} not found; pretraining it: {shlex.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode != 0 or not path.exists():
        raise UserError(f"pretraining failed, no checkpoint at {path}: {shlex.join(cmd)}")
    return path


def resumed_args(args, run_control: tuple[str, ...]):
    """With --resume, the Args the run goes on with: the run's own saved settings, and this command's `run_control`
    flags (budgets, saving, logging, workers). A flag left at its default takes the run's value, so a run resumes as
    it started even where a default has changed since; a setting given another value than the run's is an error."""
    if not args.resume:
        return args
    if not Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume!r} is not a file")
    try:
        state = torch.load(args.resume, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # not a torch.save file (a log, a truncated copy): one line, not a traceback
        raise UserError(f"--resume {args.resume!r} is not a run state: torch.load failed ({type(e).__name__})") from None
    # grpo_dt.py's states before 2026-11-22 kept the settings at the top level only
    saved = state.get("finetune", {}).get("args", state.get("finetune_args")) if isinstance(state, dict) else None
    if saved is None:
        raise UserError(f"--resume {args.resume!r} is not a run state with saved settings (a --save-every state.pt)")
    foreign = sorted(saved.keys() - {f.name for f in fields(args)})
    if foreign:  # another script's state (or a flag since removed): its run cannot go on here
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in foreign[:3])
        script = Path(__file__).name
        raise UserError(f"--resume {args.resume!r} was saved by another script or version ({flags} are not {script} flags)")
    defaults, names = type(args)(), {f.name for f in fields(args)} - set(run_control)
    clashes = [
        f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run's: {saved[k]!r})"
        for k in sorted(names & saved.keys())
        if getattr(args, k) != getattr(defaults, k) and getattr(args, k) != saved[k]
    ]
    if clashes:
        raise UserError(f"--resume keeps the run's own settings, but this command sets {', '.join(clashes)}")
    return replace(args, **{k: v for k, v in saved.items() if k in names})


# ---- end shared: load-checkpoint ----


MIN_ROWS = 16  # below this many rows CPU matmuls take other kernels, which round differently (measured: 1-3 rows)


@dataclass
class Actor:
    """What a rollout needs besides the envs: the DT, its state normalisation and RTG scale, c_online, the time limit
    and the torch generator of action noise."""

    model: nn.Module
    state_mean: torch.Tensor
    state_std: torch.Tensor
    rtg_scale: float
    c: int
    max_steps: int
    gen: torch.Generator
    std_scale: float = 1.0
    """the policy's sigma is the DT's times this (Args.std_scale)"""
    pad_to: int = MIN_ROWS
    """policy batches under this many rows are padded (`policy_step`); evaluation uses 1, the forward of every script"""
    stage_graphs: bool = False
    """act for every member of a pipeline stage at fixed shapes, one CUDA graph replay per stage and step on CUDA
    (`StageGraph`; --cuda-graphs)"""

    def norm(self, obs) -> torch.Tensor:
        return (torch.as_tensor(obs, dtype=torch.float32, device=self.gen.device) - self.state_mean) / self.state_std


# ---------------------------------------------------------------- algorithm pieces
class NonFinite(Exception):
    """A NaN/inf action or loss; main turns it into a one-line UserError and keeps the last good run state."""


def squashed_logprob(mean, log_std, u):
    """log pi(tanh(u)) summed over action dims, from the pre-tanh sample u (no atanh round trip near +-1); unvalidated
    like `squashed_gaussian`, so a NaN reaches the non-finite guard."""
    base = Normal(mean, log_std.exp(), validate_args=False).log_prob(u)
    return (base - TanhTransform().log_abs_det_jacobian(u, torch.tanh(u))).sum(-1)


def masked_mean(x, mask, dim=None):
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def reset_probs(variances: np.ndarray, uniform: bool = False) -> np.ndarray:
    """Active sampling (Sec. 3.2): p_h = softmax(sigma_h^2) over a trajectory's steps, sigma_h^2 = mean action variance."""
    if uniform:
        return np.full(len(variances), 1.0 / len(variances))
    z = np.exp(variances - variances.max())
    return z / z.sum()


def sample_reset_points(lengths, variances, rng, n_trajs, K, G, uniform=False, consistent=True, start_only=False):
    """(trajectory, step) per group member, shape (n_trajs*K, G): trajectories drawn in proportion to length
    (Alg. 1 line 3), K reset points each (line 5); a consistent group shares its point."""
    lengths = np.asarray(lengths, np.float64)
    trajs, steps = [], []
    for b in rng.choice(len(lengths), n_trajs, p=lengths / lengths.sum()):
        p = reset_probs(variances[b], uniform=uniform)
        h = np.zeros((K, 1), np.int64) if start_only else rng.choice(len(p), (K, 1) if consistent else (K, G), p=p)
        steps.append(np.broadcast_to(h, (K, G)))
        trajs.append(np.full((K, G), b))
    return np.concatenate(trajs), np.concatenate(steps)


def discounted_returns(rewards: np.ndarray, valid: np.ndarray, gamma: float) -> np.ndarray:
    """sum_t gamma^t r_t over the steps a member was alive (it stops at termination)."""
    return (rewards * valid * gamma ** np.arange(rewards.shape[1])).sum(1)


def group_advantages(rewards: np.ndarray, delta_r: float):
    """Eq. 2 per group (rows), and the keep mask of B.1: drop members within delta_r of the group mean."""
    mean, std = rewards.mean(1, keepdims=True), rewards.std(1, keepdims=True)
    return (rewards - mean) / (std + 1e-8), np.abs(rewards - mean) > delta_r


def sequence_ratio(logp, logp_old, valid, mode: str = "sequence"):
    """Eq. 3's pi_theta(tau)/pi_old(tau) = exp(sum_t log-ratio) over the L_traj real steps ("sequence"); ablations:
    "geometric" exp(mean_t log-ratio) (GSPO) and "token" per-step ratios (B, L). Capped at e^20 to stay finite."""
    diff = (logp - logp_old) * valid
    if mode == "token":
        return diff.clamp(max=20).exp()
    if mode == "geometric":
        return (diff.sum(-1) / valid.sum(-1).clamp(min=1)).clamp(max=20).exp()
    return diff.sum(-1).clamp(max=20).exp()


def grpo_loss(ratio, adv, valid, eps):
    """-min(ratio*A, clip(ratio, 1-eps, 1+eps)*A), batch mean (token ratios: mean over real steps first); and per
    sub-trajectory, the fraction of its ratio(s) outside [1-eps, 1+eps]."""
    adv = adv[:, None] if ratio.dim() == 2 else adv
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    clipped = ((ratio - 1).abs() > eps).float()
    if ratio.dim() == 2:
        surr, clipped = masked_mean(surr, valid, 1), masked_mean(clipped, valid, 1)
    return -surr.mean(), clipped


def clip_breakdown(clipped, born, adv, iteration: int) -> dict:
    """Clip fraction split by sample age (pushed this iteration vs earlier) and by the sign of the advantage."""
    fresh, positive = born == iteration, adv > 0
    split = {"fresh": fresh, "stale": ~fresh, "adv_pos": positive, "adv_neg": ~positive}
    return {f"clipfrac_{k}": clipped[m].mean().item() if m.any() else float("nan") for k, m in split.items()}


def subtraj_policy(model, batch, c: int, std_scale: float):
    """mean, log_std (B, L, A) of the policy (sigma scaled by `std_scale`) at every step of buffered sub-trajectories,
    each from the c-token window it saw."""
    B = batch["adv"].shape[0]
    # (B, c-1+L, ...) -> (B*L, c, ...): unfold gives (B, L, ..., c)
    keys = ("rtg", "states", "actions", "mask")
    mean, log_std = model(*(batch[k].unfold(1, c, 1).movedim(-1, 2).reshape(-1, c, *batch[k].shape[2:]) for k in keys))
    log_std = log_std + math.log(std_scale)
    return mean[:, -1].view(B, -1, mean.shape[-1]), log_std[:, -1].view(B, -1, mean.shape[-1])


def policy_step(model: DecisionTransformer, rtg, states, actions, pad_mask, pad_to: int = MIN_ROWS):
    """`model(...)`'s mean and log_std at the last state token, without the work nothing reads: the current action
    token (the last, seen by no state token) in every block, and in the last block the projection and MLP of every
    token but that state token. Bit for bit the full forward's in any batch of MIN_ROWS or more, so a member's output
    does not depend on its batch (tested on batches of 1-600): the same matmul rows and elementwise ops. Smaller
    batches are padded to `pad_to` rows (rollouts: the pipelined rollout then equals the in-process one); below
    MIN_ROWS without padding (evaluation, as every script evaluates), on a GPU or with dropout on, it is the full
    forward on this batch. Halves the rollout's forward at c_online 1."""
    B, T, _ = states.shape
    cpu_inference = states.device.type == "cpu" and not model.training
    if B < pad_to and cpu_inference:
        padded = (torch.cat([x, x[:1].expand(pad_to - B, *x.shape[1:])]) for x in (rtg, states, actions, pad_mask))
        return tuple(y[:B] for y in policy_step(model, *padded, pad_to=pad_to))
    if B < MIN_ROWS or not cpu_inference:
        return tuple(x[:, -1] for x in model(rtg, states, actions, pad_mask))
    tokens = torch.stack([model.embed_rtg(rtg), model.embed_state(states), model.embed_action(actions)], dim=2)
    x, n = model.embed_ln(tokens.reshape(B, 3 * T, -1)[:, :-1]), 3 * T - 1
    real = pad_mask.repeat_interleave(3, dim=1)[:, :-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    mask = ((causal & real[:, None, :]) | torch.eye(n, dtype=torch.bool, device=x.device))[:, None]
    for i, block in enumerate(model.blocks):
        E = x.shape[-1]
        qkv = block.qkv(block.ln1(x)).view(B, x.shape[1], 3, block.n_heads, E // block.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(*qkv, attn_mask=mask)
        if i == len(model.blocks) - 1:  # only the last state token goes on
            y, x = y[:, :, -1:], x[:, -1:]
        x = x + block.proj(y.transpose(1, 2).reshape(B, x.shape[1], E))
        x = x + block.mlp(block.ln2(x))
    h = model.ln_f(x[:, -1])
    log_std = torch.tanh(model.log_std_head(h))
    return model.mean_head(h), model.log_std_min + 0.5 * (model.log_std_max - model.log_std_min) * (log_std + 1)


def window_step(actor: Actor, win, rtg, states, noise) -> dict:
    """One policy step on (rtg, states, actions, mask) context windows (B, c, ...), in place: shift them by a step,
    write the current RTG and state, act with u = mean + sigma * noise (noise 0: the mean) and write a = tanh(u) as
    the current action token. The step's tokens and outputs."""
    for x in win:
        x.copy_(x.roll(-1, 1))
    win[0][:, -1, 0] = rtg
    win[1][:, -1] = states
    win[2][:, -1] = 0.0  # the current action token: filled below, seen by no state token
    win[3][:, -1] = True
    mean, log_std = policy_step(actor.model, *win, pad_to=actor.pad_to)
    log_std = log_std + math.log(actor.std_scale)
    u = mean + log_std.exp() * noise
    a = torch.tanh(u)
    win[2][:, -1] = a
    return {"rtg": rtg, "states": states, "actions": a, "u": u, "mean": mean, "log_std": log_std}


class StageGraph:
    """One pipeline stage's policy step for all of its members at fixed shapes (finished members are computed and not
    read), captured once per rollout as a CUDA graph and replayed every step. The eager step launches a hundred-odd
    small kernels whose launch latency, not arithmetic, bounds a GPU rollout: on an H200 a stage step of 256 members
    took 0.57 ms with the graph against 2.49 ms eager (README, Rollout speed). It owns the stage's context windows
    and records each step's tokens and outputs at step `t_dev` of its history. Off CUDA it runs eagerly (tests: the
    same episodes as the masked step bit for bit, a member's output not depending on its batch)."""

    def __init__(self, actor: Actor, win, rows, s_cur, rtg_cur, noise, t_dev, T: int):
        self.actor, self.s_cur, self.rtg_cur, self.noise, self.t_dev = actor, s_cur, rtg_cur, noise, t_dev
        self.rows = torch.as_tensor(rows, device=s_cur.device)
        self.win = [x[self.rows] for x in win]
        M, A = len(rows), noise.shape[1]
        shapes = {"rtg": (), "states": s_cur.shape[1:], "actions": (A,), "u": (A,), "mean": (A,), "log_std": (A,)}
        self.hist = {k: s_cur.new_zeros((T, M, *shape)) for k, shape in shapes.items()}
        self.graph = None
        if s_cur.is_cuda:  # warm up on a side stream (lazy inits), put the state back, then capture
            saved = [x.clone() for x in self.win]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            for x, y in zip(self.win, saved):
                x.copy_(y)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.actions = self.step()

    def step(self) -> torch.Tensor:
        """`window_step` for every member of the stage, recorded at step `t_dev`; the actions."""
        rows = self.rows
        step = window_step(self.actor, self.win, self.rtg_cur[rows], self.s_cur[rows], self.noise[rows])
        for k, v in step.items():
            self.hist[k].index_copy_(0, self.t_dev, v[None])
        return step["actions"]

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.actions


@contextlib.contextmanager
def deterministic_algorithms_off():
    """Rollouts run inference kernels and write rows by unique member indices, which are deterministic either way;
    torch's deterministic mode (--torch-deterministic) only slows them (on an H200 it doubled the policy step's
    latency, 6.4 -> 3.2 ms, with the same scores: README, Rollout speed), so it is off inside and restored after."""
    on, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(on, warn_only=warn_only)


@torch.inference_mode()
@deterministic_algorithms_off()
def rollout(actor: Actor, envs, idx, state0, rtg0, prefix, n_stochastic, n_deterministic, record_sim=False):
    """Members `idx` of `envs` in lockstep: batched forwards, finished members masked, not stepped.

    state0 (N,S) normalised, rtg0 (N,) scaled, prefix = (rtg, states, actions, mask) of the c_online-1 tokens before.
    `n_stochastic` steps of tanh(u), u ~ N(mean, std), then tanh(mean). Returns (N, T, ...) arrays: tokens as used, u,
    logp, action variance, mean sigma and |mean| (pre-tanh), reward, valid (+ MjData state, TimeLimit counter with
    `record_sim`). With env workers, the members of each stage of workers (`EnvPool.stages`) form a pipeline stage:
    the policy acts for one stage while the other stages' physics runs. The result does not depend on the workers or
    stages: the noise is drawn for all N members per step, and a member's policy output does not depend on the batch
    it is in (tested). With `actor.stage_graphs` each stage acts through a `StageGraph` (all its members, one CUDA
    graph replay per step) instead of the masked step over its live members."""
    N, T, device, A = len(idx), n_stochastic + n_deterministic, state0.device, actor.model.mean_head.out_features
    win = [torch.cat([x.new_zeros(x.shape[0], 1, *x.shape[2:]), x], 1) for x in prefix]  # a slot for the current step
    s_cur, rtg_cur, alive, out = state0.clone(), rtg0.clone(), np.ones(N, bool), {}
    host = {"reward": np.zeros((N, T)), "valid": np.zeros((N, T), bool)}
    if record_sim:
        host.update(sim=np.zeros((N, T, envs.get_states(idx[:1])[0].shape[1])), elapsed=np.zeros((N, T), np.int64))

    def act(t, s, live):
        """Sample (noise 0: take the mean of) the actions of members `live` of stage s at step t, record them, return
        them on the host."""
        if graphs:
            return checked(t, live, graphs[s]().cpu().numpy()[np.searchsorted(stages[s], live)])
        live_t = torch.as_tensor(live, device=device)
        live_win = [x[live_t] for x in win]  # only live members are forwarded
        step = window_step(actor, live_win, rtg_cur[live_t], s_cur[live_t], noise[live_t])
        for x, y in zip(win, live_win):
            x[live_t] = y
        if not out:  # recorded on the device, copied to the host once at the end
            out.update({k: v.new_zeros((N, T, *v.shape[1:])) for k, v in step.items()})
        for k, v in step.items():
            out[k][live_t, t] = v
        return checked(t, live, step["actions"].cpu().numpy())

    def checked(t, live, actions):
        """`actions` if finite (else NonFinite), after recording the members' MjData states with `record_sim`."""
        if not np.isfinite(actions).all():
            raise NonFinite("action")
        if record_sim:
            host["sim"][live, t], host["elapsed"][live, t] = envs.get_states(idx[live])
        return actions

    def observe(t, live, obs, rew, term, trunc):
        live_t = torch.as_tensor(live, device=device)
        host["reward"][live, t], host["valid"][live, t] = rew, True
        s_cur[live_t] = actor.norm(obs)
        rtg_cur[live_t] -= torch.as_tensor(rew * actor.rtg_scale, dtype=torch.float32, device=device)
        alive[live] = ~(term | trunc)

    stages, in_flight = envs.stages(idx), {}  # stage -> (step, members, ticket) of its step under way
    noise, t_dev = torch.zeros((N, A), device=device), torch.zeros(1, dtype=torch.long, device=device)
    graphs = [StageGraph(actor, win, m, s_cur, rtg_cur, noise, t_dev, T) for m in stages] if actor.stage_graphs else []
    for t in range(T):
        if t < n_stochastic:  # drawn for all N members, whatever the stages: the result does not depend on them
            noise.normal_(generator=actor.gen)
        elif t == n_stochastic:
            noise.zero_()
        if graphs:
            t_dev.fill_(t)
        for s, members in enumerate(stages):
            if s in in_flight:
                step_t, live, ticket = in_flight.pop(s)
                observe(step_t, live, *envs.step_recv(ticket))
            live = members[alive[members]]
            if len(live):
                in_flight[s] = (t, live, envs.step_send(idx[live], act(t, s, live)))
        if not in_flight:
            break
    for step_t, live, ticket in in_flight.values():
        observe(step_t, live, *envs.step_recv(ticket))
    valid = torch.as_tensor(host["valid"], device=device)
    if graphs:  # the stages' histories, with the steps of finished members zeroed as the masked step leaves them
        for g in graphs:
            for k, v in g.hist.items():
                out.setdefault(k, v.new_zeros((N, T, *v.shape[2:])))[g.rows] = v.transpose(0, 1)
        out.update({k: torch.where(valid.view(N, T, *[1] * (v.dim() - 2)), v, 0.0) for k, v in out.items()})
    if out:  # per-step statistics in one call: elementwise kernels round by position in the batch, not by member
        mean, log_std = out.pop("mean"), out.pop("log_std")
        stats = {"logp": squashed_logprob(mean, log_std, out["u"]), "var": (2 * log_std).exp().mean(-1)}
        stats.update(sigma=log_std.exp().mean(-1), mu_abs=mean.abs().mean(-1))
        out.update({k: torch.where(valid, v, 0.0) for k, v in stats.items()})
    return {**{k: v.cpu().numpy() for k, v in out.items()}, **host}


def context_at(traj, h, c, relabel=False):
    """The c_online-1 tokens before step h of a stored trajectory (left-padded), as (rtg, states, actions, mask)."""
    lo = max(0, h - c + 1)
    rtg = traj["hindsight" if relabel else "rtg"][lo:h, None]
    parts = (rtg, traj["states"][lo:h], traj["actions"][lo:h], np.ones(h - lo, bool))
    return tuple(np.concatenate([np.zeros((c - 1 - (h - lo), *x.shape[1:]), x.dtype), x]) for x in parts)


def run_episodes(actor: Actor, envs, seeds, rtg, stochastic: bool, record_sim=False):
    """Episodes on members 0..n-1 from fresh resets at raw RTG `rtg`, sampled (Alg. 1 line 2) or tanh(mean) actions."""
    n, c, device, A = len(seeds), actor.c, actor.gen.device, actor.model.mean_head.out_features
    obs, params = envs.reset(np.arange(n), seeds)
    s0 = actor.norm(obs)
    prefix = [torch.zeros(n, c - 1, *shape, device=device) for shape in ((1,), s0.shape[1:], (A,))]
    prefix.append(torch.zeros(n, c - 1, dtype=torch.bool, device=device))  # nothing before the first step
    rtg0 = torch.full((n,), rtg * actor.rtg_scale, device=device)
    steps = (actor.max_steps, 0) if stochastic else (0, actor.max_steps)
    return rollout(actor, envs, np.arange(n), s0, rtg0, prefix, *steps, record_sim=record_sim), params


def store_trajectories(out, params, scale):
    """Per-episode dicts for the full-trajectory buffer: tokens as used, MjData per step, params, hindsight RTG."""
    trajs = []
    for m in range(len(params)):
        traj = {k: v[m, : int(out["valid"][m].sum())] for k, v in out.items()}
        hindsight = np.cumsum(traj["reward"][::-1])[::-1] * scale  # read only by --relabel
        trajs.append({**traj, "params": params[m], "hindsight": hindsight.astype(np.float32)})
    return trajs


def collect_groups(actor: Actor, envs, full_buffer, args: Args, rng):
    """Alg. 1 lines 3-8 -> (kept members' buffer items, (groups, G) rewards, keep mask, rollout arrays + reset_step)."""
    c, L, G, device = args.c_online, args.subtraj_len, args.group_size, actor.gen.device
    lengths, variances = [len(t["reward"]) for t in full_buffer], [t["var"] for t in full_buffer]
    opts = dict(n_trajs=args.trajs_per_iter, K=args.reset_points, G=G, uniform=args.reset_sampling == "uniform")
    tr, h = sample_reset_points(
        lengths, variances, rng, consistent=args.consistent_reset, start_only=args.full_trajectory, **opts
    )
    trajs, h = [full_buffer[b] for b in tr.ravel()], h.ravel()

    def at(key):
        return np.array([t[key][j] for t, j in zip(trajs, h)])

    prev, params = np.empty(len(h), object), np.empty(len(h), object)
    prev[:] = [t["sim"][j - 1] if j > 0 else None for t, j in zip(trajs, h)]
    params[:] = [t["params"] for t in trajs]
    envs.restore(np.arange(len(h)), params, prev, at("sim"), at("elapsed"))
    ctx = [np.stack(x) for x in zip(*(context_at(t, j, c) for t, j in zip(trajs, h)))]
    state0, rtg0 = torch.as_tensor(at("states"), device=device), torch.as_tensor(at("rtg"), device=device)
    prefix = [torch.as_tensor(x, device=device) for x in ctx]
    out = rollout(actor, envs, np.arange(len(h)), state0, rtg0, prefix, L, args.eval_len)
    rewards = discounted_returns(out["reward"], out["valid"], args.gamma).reshape(-1, G)
    adv, keep = (x.ravel() for x in group_advantages(rewards, args.delta_r))
    rtg_tokens = out["rtg"][:, :L]
    if args.relabel:  # ablation: the achieved return-to-go replaces the RTG the actions were sampled under
        ctx[0] = np.stack([context_at(t, j, c, relabel=True)[0] for t, j in zip(trajs, h)])
        rtg_tokens = (np.cumsum(out["reward"][:, ::-1], 1)[:, ::-1][:, :L] * actor.rtg_scale).astype(np.float32)
    valid = out["valid"][:, :L]
    out["reset_step"] = h  # diagnostics: where in their episodes the groups start
    tokens = (rtg_tokens[..., None], out["states"][:, :L], out["actions"][:, :L], valid)
    items = {k: np.concatenate([before, x], 1) for k, before, x in zip(("rtg", "states", "actions", "mask"), ctx, tokens)}
    items.update(u=out["u"][:, :L], logp_old=out["logp"][:, :L], valid=valid, adv=adv)
    return {k: v[keep] for k, v in items.items()}, rewards, keep, out


def grpo_objective(model, ref_model, batch, args: Args, kappa, n_items=None, n_steps=None):
    """Eq. 3 as a loss to minimise: clipped surrogate (a mean over sub-trajectories) + beta KL(pi || pi_ref) - kappa
    entropy (means over real steps); and its terms, detached, with each sub-trajectory's ratio(s) and clip fraction.
    A chunk of a larger batch passes the batch's counts `n_items`, `n_steps`, which scale its terms by its share of
    them: the chunks' losses then add up to the whole batch's (`grpo_backward`)."""
    valid = batch["valid"]
    item_share = 1.0 if n_items is None else len(valid) / n_items
    step_share = 1.0 if n_steps is None else valid.sum().item() / n_steps
    mean, log_std = subtraj_policy(model, batch, args.c_online, args.std_scale)
    ratio = sequence_ratio(squashed_logprob(mean, log_std, batch["u"]), batch["logp_old"], valid, args.ratio)
    pg_loss, clipped = grpo_loss(ratio, batch["adv"], valid, args.clip_coef)
    with torch.no_grad():
        ref_mean, ref_log_std = subtraj_policy(ref_model, batch, args.c_online, args.std_scale)
    # tanh is a bijection, so KL(pi || pi_ref) is the base Gaussians' KL; per step, averaged over real steps
    pi, pi_ref = Normal(mean, log_std.exp(), validate_args=False), Normal(ref_mean, ref_log_std.exp(), validate_args=False)
    kl = masked_mean(kl_divergence(pi, pi_ref).sum(-1), valid) * step_share
    # single-sample entropy (tanh-Gaussian has no closed form); log_prob sums over the action dims
    dist = squashed_gaussian(mean, log_std)
    entropy = masked_mean(-dist.log_prob(dist.rsample()), valid) * step_share
    pg_loss = pg_loss * item_share
    terms = {"policy_loss": pg_loss, "kl": kl, "entropy": entropy, "ratio": ratio, "clipped": clipped}
    return pg_loss + args.kl_coef * kl - kappa * entropy, {k: v.detach() for k, v in terms.items()}


def grpo_backward(model, ref_model, batch, args: Args, kappa, iteration=None):
    """Backpropagate Eq. 3 on a batch, in chunks of whole sub-trajectories of at most --update-chunk-steps policy
    steps (--full-trajectory's 256 x 1000 steps would hold ~20 GB of activations at once); the chunks' gradients add
    up to the whole batch's. Returns the batch's entropy and stats (with `iteration`, also the clip fraction by sample
    age and advantage sign)."""
    valid = batch["valid"]
    (n_items, L), n_steps = valid.shape, valid.sum().item()
    size = max(1, args.update_chunk_steps // L) if args.update_chunk_steps else n_items
    # chunks of similar lengths, each cut after its last real step: whole episodes are mostly padding
    order = valid.sum(1).argsort(stable=True) if size < n_items else torch.arange(n_items)
    parts = []
    for rows in order.split(size):
        chunk = {k: v[rows] for k, v in batch.items()}
        cut = L - int(chunk["valid"].any(0).nonzero().max()) - 1 if size < n_items and chunk["valid"].any() else 0
        chunk = {k: v[:, : v.shape[1] - cut] if v.dim() > 1 else v for k, v in chunk.items()}
        loss, terms = grpo_objective(model, ref_model, chunk, args, kappa, n_items=n_items, n_steps=n_steps)
        if not torch.isfinite(loss):
            raise NonFinite("loss")
        loss.backward()
        terms["ratio"] = F.pad(terms["ratio"], (0, cut), value=1.0) if terms["ratio"].dim() == 2 else terms["ratio"]
        parts.append(terms)
    terms = {k: sum(p[k] for p in parts) for k in ("policy_loss", "kl", "entropy")}
    ratio, clipped = (torch.cat([p[k] for p in parts]) for k in ("ratio", "clipped"))
    stats = {k: v.item() for k, v in terms.items()}
    stats.update(
        clipfrac=clipped.mean().item(), kappa=float(kappa), ratio_mean=ratio.mean().item(), ratio_max=ratio.max().item()
    )
    if iteration is not None:
        stats.update(clip_breakdown(clipped, batch["born"][order], batch["adv"][order], iteration))
    return terms["entropy"], stats


class SubtrajBuffer:
    """FIFO of sub-trajectories: the reset context plus L_traj tokens, u, old log-probs, valid steps, advantage.

    It also counts how often each item is drawn; `retired_draws` holds the counts of the items the last `add` evicted
    (how stale the data the policy learns from gets)."""

    def __init__(self, capacity, device):
        self.data, self.capacity, self.device, self.ptr, self.size = {}, capacity, device, 0, 0
        self.draws, self.retired_draws = np.zeros(capacity, np.int64), np.zeros(0, np.int64)

    def add(self, items: dict):
        if not self.data:  # storage shaped after the first items
            for k, v in items.items():
                dtype = torch.bool if v.dtype == bool else torch.float32
                self.data[k] = torch.zeros((self.capacity, *v.shape[1:]), dtype=dtype, device=self.device)
        n = min(len(items["adv"]), self.capacity)
        slots = (self.ptr + np.arange(n)) % self.capacity
        self.retired_draws = self.draws[slots[slots < self.size]].copy()
        self.draws[slots] = 0
        for k, v in items.items():
            self.data[k][slots] = torch.as_tensor(v[-n:], dtype=self.data[k].dtype, device=self.device)
        self.ptr, self.size = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity)

    def sample(self, n, rng):
        idx = rng.integers(0, self.size, n)
        np.add.at(self.draws, idx, 1)
        i = torch.as_tensor(idx, device=self.device)
        return {k: v[i] for k, v in self.data.items()}


# ---------------------------------------------------------------- run state
class RunState:
    """What --resume restores bit-exactly: policy, pi_ref, kappa and optimisers, both buffers, every rng, counters."""

    def __init__(self, actor: Actor, args: Args, run_name: str):
        model, device, self.gen, self.run_name = actor.model, actor.gen.device, actor.gen, run_name
        self.model, self.ref_model = model, copy.deepcopy(model)
        self.log_kappa = torch.tensor(math.log(args.kappa_initial), device=device, requires_grad=True)
        self.optimizer = Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.kappa_opt = torch.optim.Adam([self.log_kappa], lr=args.kappa_lr)
        self.full_buffer = deque(maxlen=args.full_buffer_size)
        self.sub_buffer = SubtrajBuffer(args.subtraj_buffer_size, device)
        self.rng = np.random.default_rng(args.seed)
        self.iteration = self.env_steps = self.grad_updates = 0

    def state_dict(self) -> dict:
        b = self.sub_buffer
        ft = {k: getattr(self, k) for k in ("iteration", "env_steps", "grad_updates", "run_name")}
        ft.update({k: getattr(self, k).state_dict() for k in ("optimizer", "kappa_opt", "ref_model")})
        ft.update(log_kappa=float(self.log_kappa.detach()), rng=self.rng.bit_generator.state, torch_gen=self.gen.get_state())
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        ft.update(torch_rng=torch.get_rng_state(), cuda_rng=cuda_rng)  # the global rngs feed the entropy's rsample
        ft.update(full_buffer=list(self.full_buffer))
        ft.update(sub_buffer={k: v.cpu() for k, v in b.data.items()}, sub_ptr=b.ptr, sub_size=b.size, sub_draws=b.draws)
        return ft

    def load_state_dict(self, ft: dict):
        for k in ("iteration", "env_steps", "grad_updates"):
            setattr(self, k, ft[k])
        self.run_name = ft.get("run_name", self.run_name)
        for k in ("optimizer", "kappa_opt", "ref_model"):
            getattr(self, k).load_state_dict(ft[k])
        with torch.no_grad():
            self.log_kappa.copy_(torch.tensor(ft["log_kappa"]))
        self.full_buffer.extend(ft["full_buffer"])
        b = self.sub_buffer
        b.data, b.ptr, b.size = {k: v.to(b.device) for k, v in ft["sub_buffer"].items()}, ft["sub_ptr"], ft["sub_size"]
        b.draws = ft.get("sub_draws", np.zeros(b.capacity, np.int64))  # a diagnostic; older states restart it at zero
        self.rng.bit_generator.state = ft["rng"]
        self.gen.set_state(ft["torch_gen"])
        if "torch_rng" in ft:  # older states lack the global rngs
            torch.set_rng_state(ft["torch_rng"])
        if ft.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ft["cuda_rng"])


def save_checkpoint(path, ckpt: dict, st: RunState, args: Args, score: float, with_state: bool = True):
    """The finetuned DT as a format-1 checkpoint (loadable by `load_model`), plus with `with_state` the run state that
    --resume reads; written atomically (tmp + os.replace), so a crash never truncates it."""
    out = {k: v for k, v in ckpt.items() if k != "finetune"}
    out.update(state_dict={k: v.detach().cpu() for k, v in st.model.state_dict().items()}, eval_normalized_score=score)
    out.update(finetune_args=asdict(args), **({"finetune": st.state_dict() | {"args": asdict(args)}} if with_state else {}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


# ---------------------------------------------------------------- main helpers
def setup(args: Args):
    """Presets, checks, seeds, device; the envs (worker processes fork before the model exists); the pretrained (or
    resumed) DT as an `Actor`, and its checkpoint dict."""
    family, key = env_family(args.env_id)
    probe = make_env(args.env_id, **({"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}))
    S, A, T_max = probe.observation_space.shape[0], probe.action_space.shape[0], probe.spec.max_episode_steps
    if args.score_to_end:  # members stop at the time limit (their TimeLimit counters are restored), so T_max reaches it
        args.eval_len = T_max if args.eval_len is None else args.eval_len
        args.gamma = 1.0 if args.gamma is None else args.gamma
    row = apply_presets(args, family, key)
    args.eval_context_len = args.eval_context_len or args.c_online
    if (
        min(args.num_workers, args.pipeline_stages, args.update_chunk_steps) < 0
        or min(args.c_online, args.group_size, args.reset_points, args.subtraj_len) < 1
    ):
        raise UserError(
            "--num-workers, --pipeline-stages, --update-chunk-steps must be >= 0; --c-online, --group-size, "
            "--reset-points, --subtraj-len >= 1"
        )
    if not args.std_scale > 0:
        raise UserError(f"--std-scale must be > 0, got {args.std_scale}")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.full_trajectory:  # vanilla GRPO: whole episodes from the start state, one return per episode
        args.subtraj_len, args.eval_len, args.gamma, args.reset_points = T_max, 0, 1.0, 1
    args.target_entropy = -float(A) if args.target_entropy is None else args.target_entropy
    n_members = args.trajs_per_iter * args.reset_points * args.group_size
    n_envs = max(n_members, args.full_trajs_per_iter)
    envs = EnvPool(args.env_id, n_envs, args.num_workers, args.pipeline_stages, max_episode_steps=args.max_episode_steps)
    path = args.resume or ensure_checkpoint(args)
    model, ckpt = load_model(path, device)
    if args.resume and "finetune" not in ckpt:
        raise UserError(f"--resume {path} is a checkpoint, not a run state (`state.pt`)")
    cfg, args.eval_rtg = ckpt["model_config"], ckpt["eval_rtg"] if args.eval_rtg is None else args.eval_rtg
    if (cfg["state_dim"], cfg["act_dim"]) != (S, A):
        raise UserError(
            f"checkpoint {path} ({ckpt['env_id']}) has state/action dims ({cfg['state_dim']}, {cfg['act_dim']}) "
            f"but {args.env_id} has ({S}, {A})"
        )
    print(
        f"{args.env_id}: Table 6 row {key}/{row}; c_online {args.c_online}, g_online {args.g_online}, L_traj "
        f"{args.subtraj_len}, L_eval {args.eval_len}, gamma {args.gamma}, eps {args.clip_coef}, sigma x {args.std_scale}, "
        f"Delta_r {args.delta_r}, "
        f"lr {args.learning_rate}, kappa0 {args.kappa_initial}, n_batch {args.n_batch}, {n_members} group members/"
        f"iteration, device {device}"
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    mean, std = ckpt["state_mean"].to(device), ckpt["state_std"].to(device)
    actor = Actor(
        model.eval(),
        mean,
        std,
        rtg_scale=ckpt["rtg_scale"],
        c=args.c_online,
        max_steps=T_max,
        gen=gen,
        std_scale=args.std_scale,
        stage_graphs=args.cuda_graphs and device.type == "cuda",
    )
    return envs, actor, ckpt


def start_logging(args: Args, run_name: str) -> SummaryWriter:
    """TensorBoard writer of `{runs_dir}/{run_name}` with the hyperparameters; wandb too with --track."""
    if args.track:
        import wandb

        opts = dict(config=vars(args), name=run_name, sync_tensorboard=True, save_code=True)
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, **opts)
    writer = SummaryWriter(f"{args.runs_dir}/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


def evaluate(actor: Actor, envs, args: Args, ckpt: dict, writer, iteration: int) -> dict:
    """Deterministic tanh(mean) episodes at --eval-rtg with context --eval-context-len, logged at `iteration`."""
    rets, lengths = np.array([np.nan]), np.array([np.nan])
    if args.eval_episodes:
        seeds = eval_seeds(args.seed, args.eval_episodes)
        policy = replace(actor, c=args.eval_context_len, pad_to=1)
        ev, _ = run_episodes(policy, envs, seeds, args.eval_rtg, stochastic=False)
        rets, lengths = ev["reward"].sum(1), ev["valid"].sum(1)
    scores = 100 * (rets - ckpt["ref_min_score"]) / (ckpt["ref_max_score"] - ckpt["ref_min_score"])
    ev = {"normalized_score": scores.mean(), "normalized_score_se": scores.std() / np.sqrt(len(scores))}
    ev.update(eval_return=rets.mean(), eval_length=lengths.mean(), eval_reward_per_step=rets.sum() / max(lengths.sum(), 1))
    for k, v in ev.items():
        writer.add_scalar(f"charts/{k}", v, iteration)
    return {k: float(v) for k, v in ev.items()}


def log_iteration(writer, iteration: int, st: RunState, full, groups, stats: list, timing: dict, ev: dict):
    """Per-iteration scalars of the full and group rollouts, the updates and the timings; the iteration's line."""
    live, rewards, keep, draws = full["valid"], groups["group_reward"], groups["keep"], st.sub_buffer.retired_draws
    s = {"charts/episodic_return": full["reward"].sum(1).mean(), "charts/episodic_length": live.sum(1).mean()}
    s.update({"charts/env_steps": st.env_steps, "charts/grad_updates": st.grad_updates})
    s.update({f"charts/{k}": v for k, v in timing.items()})
    s.update({"losses/group_reward_std": rewards.std(1).mean(), "losses/dropped_fraction": 1 - keep.mean()})
    s.update({"charts/reset_step_mean": groups["reset_step"].mean(), "charts/reset_step_max": groups["reset_step"].max()})
    s.update({"charts/rollout_sigma": full["sigma"][live].mean(), "charts/rollout_mu_abs": full["mu_abs"][live].mean()})
    s["charts/draws_per_subtraj"] = draws.mean() if len(draws) else np.nan
    for k in (
        "policy_loss",
        "kl",
        "entropy",
        "clipfrac",
        "kappa",
        "ratio_mean",
        "ratio_max",
        "clipfrac_fresh",
        "clipfrac_stale",
        "clipfrac_adv_pos",
        "clipfrac_adv_neg",
    ):
        vals = [x[k] for x in stats] or [np.nan]
        s[f"losses/{k}"] = max(vals) if k == "ratio_max" else float(np.nanmean(vals))
    for k, v in s.items():
        writer.add_scalar(k, v, iteration)
    v = {**{k.split("/")[1]: x for k, x in s.items()}, **ev}
    tqdm.write(
        f"iteration {iteration}: score {v['normalized_score']:.1f} +- {v['normalized_score_se']:.1f} (eval return "
        f"{v['eval_return']:.1f}, length {v['eval_length']:.0f}, {v['eval_return'] / max(v['eval_length'], 1):.2f}/"
        f"step), train return {v['episodic_return']:.1f} (length {v['episodic_length']:.0f}), reset step "
        f"{v['reset_step_mean']:.0f}/{v['reset_step_max']}, sigma {v['rollout_sigma']:.2f}, |mu| "
        f"{v['rollout_mu_abs']:.2f}, clip fresh/stale {v['clipfrac_fresh']:.2f}/{v['clipfrac_stale']:.2f}, clip "
        f"A+/A- {v['clipfrac_adv_pos']:.2f}/{v['clipfrac_adv_neg']:.2f}, draws {v['draws_per_subtraj']:.1f}, ratio "
        f"{v['ratio_mean']:.3f}/{v['ratio_max']:.2f}, clip {v['clipfrac']:.2f}, kl {v['kl']:.4f}, entropy "
        f"{v['entropy']:.2f}, kappa {v['kappa']:.4f}, group std {v['group_reward_std']:.2f}, dropped "
        f"{v['dropped_fraction']:.2f}, env steps {st.env_steps}, SPS {v['SPS']:.0f} (rollout "
        f"{v['rollout_seconds']:.1f}s of which policy {v['policy_seconds']:.1f}s, update {v['update_seconds']:.1f}s, "
        f"eval {v['eval_seconds']:.1f}s)"
    )


# ---------------------------------------------------------------- main
def main(args: Args):
    t_launch = time.time()  # --max-seconds counts from here, loading included
    fix_malloc_mmap_threshold()
    args = resumed_args(args, RUN_CONTROL)
    envs, actor, ckpt = setup(args)
    st = RunState(actor, args, run_name=f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    if args.resume:  # the resumed run keeps its name: it logs to the same TensorBoard run and state file
        st.load_state_dict(ckpt["finetune"])
    video_dir = f"videos/{st.run_name}" if args.capture_video else None
    eval_envs = EnvPool(args.env_id, max(1, args.eval_episodes), video_dir=video_dir, max_episode_steps=args.max_episode_steps)
    state_path = Path(args.save_path or f"{args.runs_dir}/{st.run_name}/state.pt")
    print(f"run state (for --resume): {state_path}", flush=True)
    writer = start_logging(args, st.run_name)
    model, iteration, start, steps0 = actor.model, st.iteration, time.time(), st.env_steps
    try:
        ev = evaluate(actor, eval_envs, args, ckpt, writer=writer, iteration=iteration)
        tqdm.write(
            f"iteration {iteration}: eval return {ev['eval_return']:.1f}, normalized score {ev['normalized_score']:.1f} "
            f"+- {ev['normalized_score_se']:.1f} (s.e.), eval length {ev['eval_length']:.0f}"
        )
        pbar = tqdm(range(st.iteration + 1, args.num_iterations + 1), desc="grpo-dt", mininterval=2.0)
        for iteration in pbar:
            t_iter, envs.seconds = time.time(), 0.0
            # ALGO LOGIC: Alg. 1 line 2, full trajectories from g_online, stored with the RTG tokens used and MjData per step
            seeds, sampled = train_seeds(st.rng, args.full_trajs_per_iter), args.full_rollout_actions == "sampled"
            full, params = run_episodes(actor, envs, seeds, args.g_online, stochastic=sampled, record_sim=True)
            st.full_buffer.extend(store_trajectories(full, params, actor.rtg_scale))

            # ALGO LOGIC: lines 3-8, reset points by action variance, G sub-trajectories each from the same state and
            # context, Eq. 2 advantages, Delta_r filter, FIFO push
            items, rewards, keep, groups = collect_groups(actor, envs, st.full_buffer, args, st.rng)
            st.env_steps += int(full["valid"].sum()) + int(groups["valid"].sum())
            st.sub_buffer.add({**items, "born": np.full(len(items["adv"]), iteration, np.float32)})
            t_rollout = time.time() - t_iter

            # ALGO LOGIC: line 9, Eq. 3 on n_batch uniform draws from the buffer; kappa is the entropy constraint's dual
            stats = []
            for _ in range(args.updates_per_iter if st.sub_buffer.size else 0):
                kappa = st.log_kappa.exp()
                batch = st.sub_buffer.sample(args.n_batch, st.rng)
                st.optimizer.zero_grad()
                entropy, step_stats = grpo_backward(model, st.ref_model, batch, args, kappa.detach(), iteration)
                nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                st.optimizer.step()
                kappa_loss = kappa * (entropy - args.target_entropy)
                st.kappa_opt.zero_grad()
                kappa_loss.backward()
                st.kappa_opt.step()
                st.grad_updates += 1
                if st.grad_updates % args.ref_update_every == 0:
                    st.ref_model.load_state_dict(model.state_dict())
                stats.append(step_stats)
            if st.log_kappa.is_cuda:  # the update's kernels are queued: count them here, not in the evaluation
                torch.cuda.synchronize()
            t_update = time.time() - t_iter - t_rollout

            # Evaluation, logging, run state, budgets
            ev = evaluate(actor, eval_envs, args, ckpt, writer=writer, iteration=iteration)
            st.iteration = iteration
            sps = (st.env_steps - steps0) / max(time.time() - start, 1e-9)
            timing = {"SPS": sps, "rollout_seconds": t_rollout, "update_seconds": t_update, "env_seconds": envs.seconds}
            timing.update(policy_seconds=t_rollout - envs.seconds, eval_seconds=time.time() - t_iter - t_rollout - t_update)
            groups.update(group_reward=rewards, keep=keep)
            log_iteration(writer, iteration, st, full=full, groups=groups, stats=stats, timing=timing, ev=ev)
            pbar.set_postfix(score=f"{ev['normalized_score']:.1f}", steps=st.env_steps)
            done = (args.total_env_steps and st.env_steps >= args.total_env_steps) or iteration == args.num_iterations
            done = done or (args.max_seconds and time.time() - t_launch >= args.max_seconds)
            if args.save_every and (iteration % args.save_every == 0 or done):
                save_checkpoint(state_path, ckpt, st, args, ev["normalized_score"])
                if args.keep_states:
                    shutil.copyfile(state_path, state_path.with_name(f"state_it{iteration:04d}.pt"))
            if done:
                break
    except NonFinite as e:
        raise UserError(f"non-finite {e} at iteration {iteration}; stopped, last good state kept at {state_path}") from None
    if args.save_model:
        save_checkpoint(state_path.parent / f"{args.exp_name}.pt", ckpt, st, args, ev["normalized_score"], with_state=False)
    envs.close()
    eval_envs.close()
    writer.close()
    print(f"final normalized score {ev['normalized_score']:.1f} after {iteration} iterations, {st.env_steps} env steps")
    return ev["normalized_score"]


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
