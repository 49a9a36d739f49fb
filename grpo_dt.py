"""GRPO-DT: online finetuning of a pretrained Decision Transformer with pure GRPO gradients.

Luo & Zhu, "Online Finetuning Decision Transformers with Pure RL Gradients": Sec. 3.2, Alg. 1, Eqs. 2-3, App. B.1,
Tables 5-6. grpo_dt_fast.py runs the same algorithm with faster env steps and rollouts. A Reinformer checkpoint
(pretrain_dt.py --arch reinformer, Fig. 4a) acts on the return-to-go it predicts, stored with its trajectories.

Example (pretrains the checkpoint first if it is missing):
    python grpo_dt.py --env-id Hopper-v4 --dataset medium
"""

import contextlib
import copy
import ctypes
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
import warnings
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


@dataclass
class Args:
    # ---- shared: args-header (identical in every script; tests/test_shared_blocks.py) ----
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment (python, numpy, torch, env resets and action sampling)
    torch_deterministic: bool = True  # if toggled, cudnn and torch use deterministic algorithms
    cuda: bool = True  # if toggled, cuda is used when available
    track: bool = False  # if toggled, log to Weights and Biases (wandb is imported only then)
    wandb_project_name: str = "grpo-dt"  # the wandb project name
    wandb_entity: Optional[str] = None  # the wandb entity (team)
    capture_video: bool = False  # if toggled, record the first evaluation episode of every evaluation to `videos/{run_name}`
    runs_dir: str = "runs"  # TensorBoard root; the run logs to `{runs_dir}/{run_name}`
    env_id: str = "Hopper-v4"  # Hopper/Walker2d/Ant/HalfCheetah-v4|v5, AdroitHandDoor/Hammer/Pen-v1, AntMaze_UMaze-v4|v5
    dataset: str = "medium"  # medium, medium-replay, random, expert, human, cloned, umaze, umaze-diverse, or a Minari id
    dataset_path: Optional[str] = None  # a D4RL-format HDF5 file to read instead of the Minari set
    # ---- end shared: args-header ----
    # ---- shared: finetune-args (identical in every finetuning DT script; tests/test_shared_blocks.py) ----
    checkpoint: Optional[str] = None  # pretrained DT; default checkpoints/{env}__{dataset}__s{seed}.pt, pretrained if missing
    pretrain_extra_args: str = ""  # extra pretrain_dt.py flags for that automatic pretraining, e.g. "--num-updates 2000"
    eval_episodes: int = 10  # deterministic tanh(mean) evaluation episodes, at iteration 0 and after every iteration
    eval_rtg: Optional[float] = None  # target return that conditions evaluation (raw reward units); default the checkpoint's
    eval_context_len: Optional[int] = None  # DT context of evaluation; default the context the script acts with
    # ---- end shared: finetune-args ----
    scale: Literal["paper", "cpu"] = "paper"  # cpu: a small DT if pretrained, narrow exploration, MuJoCo gamma 1
    num_iterations: int = 100  # outer iterations of Algorithm 1 (0: only evaluate the checkpoint)
    total_env_steps: int = 0  # stop after the iteration where training env steps reach this (0: no budget)
    max_seconds: float = 0  # stop after the iteration where the seconds since launch reach this (0: no budget)
    save_every: int = 5  # write the run state every this many iterations and at the end; 0 = never
    save_path: Optional[str] = None  # where the run state goes; default `{runs_dir}/{run_name}/state.pt`
    resume: Optional[str] = None  # continue a run state; only --num-iterations, --total-env-steps, --max-seconds may change
    save_model: bool = False  # at the end, write the DT as a checkpoint to {runs_dir}/{run_name}/{exp_name}.pt
    max_episode_steps: Optional[int] = None  # override the env's time limit (tests and quick runs)

    # Table 6 (None: the row of the env and dataset)
    n_batch: Optional[int] = None  # sub-trajectories per gradient update
    c_online: Optional[int] = None  # DT context length in finetuning, rollouts and evaluation
    g_online: Optional[float] = None  # initial RTG of the full-trajectory rollouts (raw reward units)
    subtraj_len: Optional[int] = None  # L_traj: sampled steps per sub-trajectory, the part that is optimised
    eval_len: Optional[int] = None  # L_eval: tanh(mean) steps after L_traj that only score a sub-trajectory
    gamma: Optional[float] = None  # discount of a sub-trajectory's reward over its L_traj + L_eval steps
    clip_coef: Optional[float] = None  # epsilon of the clipped ratio (Eq. 3)
    delta_r: Optional[float] = None  # drop group members whose reward is within this of their group's mean
    learning_rate: Optional[float] = None  # LAMB learning rate of the policy
    kappa_initial: Optional[float] = None  # initial entropy dual variable kappa
    narrow_exploration: tyro.conf.DisallowNone[Optional[bool]] = None  # sigma x 0.25, 2x eps (MuJoCo, Adroit); cpu default
    std_scale: Optional[float] = None  # sampled sigma = the DT's x this (default 1; 0.25 with --narrow-exploration)

    # Appendix B.1 and Table 5
    full_trajs_per_iter: Optional[int] = None  # full trajectories rolled out per iteration (1; 5 on Adroit)
    full_buffer_size: int = 32  # FIFO capacity of the full-trajectory buffer
    trajs_per_iter: int = 16  # full trajectories drawn from that buffer per iteration, in proportion to length
    reset_points: int = 4  # K: reset points per drawn trajectory
    group_size: int = 8  # G: sub-trajectories per reset point
    subtraj_buffer_size: int = 2048  # FIFO capacity of the sub-trajectory buffer
    updates_per_iter: int = 8  # gradient updates per iteration, each on n_batch uniform draws from that buffer
    kl_coef: float = 1e-3  # beta of the KL(pi || pi_ref) penalty
    ref_update_every: int = 4  # copy the policy into pi_ref every this many updates
    target_entropy: Optional[float] = None  # entropy lower bound rho; default -dim(A)
    kappa_lr: float = 1e-4  # Adam learning rate of log kappa
    weight_decay: float = 1e-4  # LAMB weight decay
    max_grad_norm: float = 0.5  # global gradient-norm clip

    # Ablations (Figs. 1, 2); the defaults are the paper's method
    relabel: bool = False  # Fig. 1: hindsight relabeling (achieved returns replace the RTG tokens at training time)
    full_trajectory: bool = False  # Fig. 2a: vanilla GRPO on whole episodes from the initial state, undiscounted, no L_eval
    consistent_reset: bool = True  # the members of a group share their reset point (--no-consistent-reset: Fig. 2b)
    ratio: Literal["sequence", "token", "geometric"] = "sequence"  # Eq. 3's; per-step (Fig. 2c); GSPO's (Fig. 2e)
    reset_sampling: Literal["variance", "uniform"] = "variance"  # softmax of action variance; uniform (Fig. 2d)
    train_rtg_head: bool = False  # Reinformer: fit its RTG head to discounted returns (expectile loss); default frozen


# Table 6 by (env, dataset); a dataset without a row takes its family's DEFAULT_ROW, medium-replay takes medium
PRESETS = "n_batch c_online g_online subtraj_len eval_len gamma clip_coef delta_r learning_rate kappa_initial".split()
TABLE6 = {
    ("hopper", "medium"): (256, 1, 7200, 15, 400, 0.995, 0.2, 2.0, 5e-5, 0.20),
    ("hopper", "random"): (256, 1, 7200, 15, 400, 0.995, 0.2, 2.0, 5e-5, 0.20),
    ("walker2d", "medium"): (256, 1, 10000, 15, 400, 0.995, 0.3, 2.0, 5e-5, 0.04),
    ("walker2d", "random"): (256, 1, 10000, 15, 400, 0.995, 0.3, 2.0, 5e-5, 0.20),
    ("ant", "medium"): (256, 1, 12000, 15, 200, 0.995, 0.3, 2.0, 5e-5, 0.04),
    ("ant", "random"): (256, 1, 12000, 15, 200, 0.995, 0.3, 2.0, 5e-5, 0.20),
    # not in the paper: HalfCheetah takes Walker2d-M's row with g_online 2x ODT's evaluation RTG 6000
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


def apply_presets(args: Args, act_dim: int, max_steps: int):
    """Fill the unset Table 6 and App. B.1 fields; --narrow-exploration's sigma and eps; the ablations' fixed values."""
    family, key = env_family(args.env_id)
    name = re.sub(r"-v\d+$", "", args.dataset.rsplit("/", 1)[-1]).replace("medium-replay", "medium")
    row = TABLE6[(key, name if (key, name) in TABLE6 else DEFAULT_ROW[family])]
    args.narrow_exploration = args.scale == "cpu" if args.narrow_exploration is None else args.narrow_exploration
    narrow = args.narrow_exploration and family != "antmaze"
    for field, value in zip(PRESETS, row):
        if field == "gamma" and args.scale == "cpu" and family == "mujoco":
            value = 1.0  # a fall late in the L_traj + L_eval window costs what an early one does (results/grpo-keeps-peak)
        if getattr(args, field) is None:
            setattr(args, field, 2 * value if narrow and field == "clip_coef" else value)
    args.std_scale = args.std_scale or (0.25 if narrow else 1.0)
    args.full_trajs_per_iter = args.full_trajs_per_iter or (5 if family == "adroit" else 1)
    args.target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy
    args.eval_context_len = args.eval_context_len or args.c_online
    if args.full_trajectory:  # one undiscounted return per whole episode from the start state
        args.subtraj_len, args.eval_len, args.gamma, args.reset_points = max_steps, 0, 1.0, 1


def check(args: Args):
    positive = "learning_rate eval_episodes eval_context_len max_episode_steps n_batch c_online subtraj_len std_scale "
    positive += "clip_coef kappa_initial kappa_lr full_trajs_per_iter full_buffer_size trajs_per_iter reset_points "
    positive += "group_size subtraj_buffer_size ref_update_every max_grad_norm"
    nonnegative = "num_iterations total_env_steps max_seconds save_every eval_len updates_per_iter kl_coef weight_decay"
    check_args(args, positive=positive.split(), nonnegative=nonnegative.split(), unit=("gamma",))


# ---------------------------------------------------------------- envs and exact resets
# ---- shared: common (identical in every script; tests/test_shared_blocks.py) ----
class UserError(Exception):
    """Bad input: printed as one line, never as a traceback."""


MUJOCO_ENVS = {"Hopper": "hopper", "Walker2d": "walker2d", "Ant": "ant", "HalfCheetah": "halfcheetah"}
ADROIT_ENVS = {"AdroitHandDoor": "door", "AdroitHandHammer": "hammer", "AdroitHandPen": "pen"}
# The paper's numbers are on the v4 MuJoCo envs; gymnasium's note that v5 exists is not a problem of the run.
warnings.filterwarnings("ignore", message=r".*is out of date\. You should consider upgrading", category=DeprecationWarning)


def env_family(env_id: str) -> tuple[str, str]:
    """(family, key) of a supported id, e.g. ("mujoco", "hopper")."""
    name, _, version = env_id.rpartition("-")
    if name in MUJOCO_ENVS and version in ("v4", "v5"):
        return "mujoco", MUJOCO_ENVS[name]
    if name in ADROIT_ENVS and version == "v1":
        return "adroit", ADROIT_ENVS[name]
    if name == "AntMaze_UMaze" and version in ("v4", "v5"):
        return "antmaze", "antmaze"
    supported = "Hopper/Walker2d/Ant/HalfCheetah-v4|v5, AdroitHandDoor/Hammer/Pen-v1, AntMaze_UMaze-v4|v5"
    raise UserError(f"unknown --env-id {env_id!r}; supported: {supported}")


def flatten_antmaze_obs(obs: dict) -> np.ndarray:
    return np.concatenate([obs["observation"], obs["desired_goal"]], axis=-1)  # achieved_goal is left out


def make_env(env_id: str, **kwargs) -> gym.Env:
    """`gym.make`, registering gymnasium-robotics for Adroit and AntMaze, AntMaze's dict observation flattened."""
    family, _ = env_family(env_id)
    if family != "mujoco":
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
    env = gym.make(env_id, **kwargs)
    if family == "antmaze":
        dim = env.observation_space["observation"].shape[0] + env.observation_space["desired_goal"].shape[0]
        env = gym.wrappers.TransformObservation(env, flatten_antmaze_obs, gym.spaces.Box(-np.inf, np.inf, (dim,), np.float64))
    return env


def eval_seeds(seed: int, n: int) -> np.ndarray:
    """Evaluation resets: the same at every evaluation of a run, disjoint across run seeds."""
    return 100_000 * seed + np.arange(n)


def train_seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    """Training resets: integers whose last five digits are >= 50_000, so never an `eval_seeds` value."""
    x = rng.integers(2**31 // 100_000 * 50_000, size=n)
    return x // 50_000 * 100_000 + 50_000 + x % 50_000


def check_args(args, positive=(), nonnegative=(), unit=()):
    """One line naming the first flag out of its range (None: a default filled in later)."""
    rules = [
        (positive, "> 0", lambda v: v > 0),
        (nonnegative, ">= 0", lambda v: v >= 0),
        (unit, "in [0, 1]", lambda v: 0 <= v <= 1),
    ]
    for names, rule, ok in rules:
        for name in names:
            if getattr(args, name) is not None and not ok(getattr(args, name)):
                raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")


def seed_everything(args) -> torch.device:
    """Seed python, numpy and torch; deterministic torch if asked; the device to run on."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.use_deterministic_algorithms(args.torch_deterministic, warn_only=True)
    if sys.platform.startswith("linux"):  # glibc's heap otherwise creeps up by GBs across large activations
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def make_writer(args, run_name: str, purge_step: Optional[int] = None) -> SummaryWriter:
    """TensorBoard at `{runs_dir}/{run_name}` (wandb too with --track); a resumed run purges the steps after its state."""
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, sync_tensorboard=True)
    if purge_step is not None:  # start in a later second than the run's older event files: TensorBoard reads it last
        time.sleep(1 - time.time() % 1)
    writer = SummaryWriter(f"{args.runs_dir}/{run_name}", purge_step=purge_step)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


# ---- end shared: common ----


STATE_SPEC = mujoco.mjtState.mjSTATE_INTEGRATION  # everything mj_step reads: qpos, qvel, act, warm start, ctrl, time, ...


class Envs:
    """n gymnasium envs in this process, addressed by member index; their states are recorded and restored exactly."""

    def __init__(self, args: Args, n: int, video_dir: Optional[str] = None):
        kw = {"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}
        self.family, self.envs = env_family(args.env_id)[0], [make_env(args.env_id, **kw) for _ in range(n)]
        if video_dir:
            self.envs[0] = gym.wrappers.RecordVideo(make_env(args.env_id, render_mode="rgb_array", **kw), video_dir)
        for e in self.envs:
            e.reset(seed=0)  # gymnasium wants a reset before the first step, also of an env that is then restored
        self.sims = [getattr(e.unwrapped, "ant_env", e.unwrapped) for e in self.envs]  # AntMaze wraps an AntEnv

    def reset(self, idx, seeds):
        """Fresh episodes: observations, and the episode's parameters outside MjData (door, pen target, maze goal)."""
        obs = np.stack([self.envs[i].reset(seed=int(s))[0] for i, s in zip(idx, seeds)])
        u = [self.envs[i].unwrapped for i in idx]
        if self.family == "adroit":  # hammer's `target_pos` is rejected by its own set_env_state
            return obs, [{k: v for k, v in e.get_env_state().items() if k != "target_pos"} for e in u]
        return obs, [{"goal": e.goal.copy()} if self.family == "antmaze" else {} for e in u]

    def step(self, idx, actions):
        obs, rew, term, trunc = zip(*(self.envs[i].step(a)[:4] for i, a in zip(idx, actions)))
        return np.stack(obs), np.array(rew, np.float64), np.array(term), np.array(trunc)

    def get_states(self, idx):
        """MjData integration states and TimeLimit counters of members `idx`."""
        states = np.zeros((len(idx), mujoco.mj_stateSize(self.sims[0].model, STATE_SPEC)))
        for sim, state in zip((self.sims[i] for i in idx), states):
            mujoco.mj_getState(sim.model, sim.data, state, STATE_SPEC)
        return states, np.array([self.envs[i].get_wrapper_attr("_elapsed_steps") for i in idx])

    def restore(self, idx, snapshots):
        """Put members where recorded episodes were before step h: (episode params, state h-1, state h, TimeLimit counter)."""
        for i, (params, prev_state, state, elapsed) in zip(idx, snapshots):
            env, sim = self.envs[i].unwrapped, self.sims[i]
            if self.family == "adroit":
                env.set_env_state(params)
            elif self.family == "antmaze":
                env.goal = params["goal"].copy()
                env.update_target_site_pos()
            mujoco.mj_setState(sim.model, sim.data, state, STATE_SPEC)
            if prev_state is None:  # h = 0: the episode's reset state
                mujoco.mj_forward(sim.model, sim.data)
            else:  # after mj_step, derived fields (xpos, contacts: Ant's reward) lag the state: re-run step h-1 to match
                ctrl = sim.data.ctrl.copy()
                mujoco.mj_setState(sim.model, sim.data, prev_state, STATE_SPEC)
                sim.do_simulation(ctrl, sim.frame_skip)
            self.envs[i].set_wrapper_attr("_elapsed_steps", int(elapsed))

    def close(self):
        for e in self.envs:
            e.close()


# ---------------------------------------------------------------- model
# ---- shared: model (identical in every DT script; tests/test_shared_blocks.py) ----
CHECKPOINT_FORMAT_VERSION = 2


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

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
    """Tokens (RTG_t, s_t, a_t), each with its own linear embedding and no positional embedding (ODT); the output at
    s_t gives the mean and log-std of a pre-tanh Gaussian over a_t. Left padding is masked out of attention."""

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
        tokens = torch.stack([self.embed_rtg(rtg), self.embed_state(states), self.embed_action(actions)], dim=2)
        return self.action_head(self.encode(tokens, pad_mask)[:, :, 1])  # the state token predicts a_t

    def encode(self, tokens, pad_mask):
        """Token embeddings (B,T,3,E) -> outputs (B,T,3,E), attention causal over the 3T tokens, padding masked."""
        B, T = pad_mask.shape
        x = self.embed_drop(self.embed_ln(tokens.reshape(B, 3 * T, -1)))
        real = pad_mask.repeat_interleave(3, dim=1)
        causal = torch.ones(3 * T, 3 * T, dtype=torch.bool, device=x.device).tril()
        # Keys must be real; every token also sees itself, so a padded query's row is never empty (no NaN).
        mask = (causal & real[:, None, :]) | torch.eye(3 * T, dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, mask[:, None])
        return self.ln_f(x).view(B, T, 3, -1)

    def action_head(self, h):
        log_std = torch.tanh(self.log_std_head(h))
        return self.mean_head(h), self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (log_std + 1)


def squashed_gaussian(mean, log_std):
    """tanh(N(mean, exp(log_std))) over independent action dims; unvalidated, so a NaN reaches the finiteness checks."""
    base = Normal(mean, log_std.exp(), validate_args=False)
    return Independent(
        TransformedDistribution(base, [TanhTransform(cache_size=1)], validate_args=False), 1, validate_args=False
    )


def action_log_prob(mean, log_std, actions, margin: float, censor_bound: Optional[float] = None):
    """log pi(a) of given actions, clamped to +-(1 - margin) so atanh is finite.

    With `censor_bound` b, a dimension on +-1 (behaviour clipped to the bound) is scored as the point mass it is,
    log P(tanh(u) beyond +-b), instead of the density at the clamp point (docs/actions-on-the-bounds.md)."""
    clamped = actions.clamp(-1 + margin, 1 - margin)
    if censor_bound is None:
        return squashed_gaussian(mean, log_std).log_prob(clamped)
    density = squashed_gaussian(mean, log_std).base_dist.log_prob(clamped)  # per dimension
    edge, std = float(np.arctanh(censor_bound)), log_std.exp()
    upper, lower = torch.special.log_ndtr((mean - edge) / std), torch.special.log_ndtr((-edge - mean) / std)
    on_bound = 1 - 1e-6  # clipped float32 data hold exactly +-1
    return torch.where(actions >= on_bound, upper, torch.where(actions <= -on_bound, lower, density)).sum(-1)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019), the paper's optimiser (torch has none): Adam's step rescaled by ||w|| / ||step||."""

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


# ---- shared: reinformer (identical in pretrain_dt.py and grpo_dt.py; tests/test_shared_blocks.py) ----
class Reinformer(DecisionTransformer):
    """Reinformer (Zhuang et al., 2024): tokens (s_t, R_t, a_t); the output at s_t predicts R_t (a high expectile: the
    max return), the one at R_t is the DT's action head. It acts on its own prediction, written into the R_t slot."""

    def __init__(self, state_dim, act_dim, embed_dim=512, expectile=0.99, **kwargs):
        super().__init__(state_dim, act_dim, embed_dim, **kwargs)
        self.expectile, self.rtg_head = expectile, nn.Linear(embed_dim, 1)

    def forward(self, rtg, states, actions, pad_mask):
        """As the DT's, plus the predicted return-to-go (B,T,1): at s_t it has not seen R_t."""
        tokens = torch.stack([self.embed_state(states), self.embed_rtg(rtg), self.embed_action(actions)], dim=2)
        h = self.encode(tokens, pad_mask)
        return (*self.action_head(h[:, :, 1]), self.rtg_head(h[:, :, 0]))


def expectile_loss(pred, target, mask, tau: float):
    """|tau - 1(u < 0)| u^2 over the real steps, u = (target - pred) / the batch's mean |target| (scale-free)."""
    m = mask.float()
    u = (target - pred) / ((target.abs() * m).sum() / m.sum()).clamp(min=1e-8)
    return ((tau - (u < 0).float()).abs() * u**2 * m).sum() / m.sum()


# ---- end shared: reinformer ----


MODELS = {"dt": DecisionTransformer, "reinformer": Reinformer}  # what `load_model` builds, by the checkpoint's arch


# ---- shared: checkpoint (identical in every DT script; tests/test_shared_blocks.py) ----
def default_checkpoint_path(env_id: str, dataset: str, seed: int, scale: str = "paper") -> Path:
    """Where pretrain_dt.py writes and the finetuning scripts look: checkpoints/{env}__{dataset}__s{seed}[__cpu].pt."""
    return Path("checkpoints") / f"{env_id}__{dataset.replace('/', '-')}__s{seed}{'' if scale == 'paper' else '__' + scale}.pt"


def save_atomic(path, payload: dict):
    """tmp file + rename: a crash never leaves a truncated file at `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


# ---- end shared: checkpoint ----


# ---- shared: resume (identical in every script that resumes; tests/test_shared_blocks.py) ----
def read_torch_file(path, flag: str):
    """torch.load, with one line for a missing, truncated or foreign file instead of a traceback."""
    if not Path(path).is_file():
        raise UserError(f"{flag} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{flag} {str(path)!r} cannot be read by torch.load ({type(e).__name__})") from None


def resume_args(args, budget: tuple[str, ...]):
    """(args, run state) of --resume: the run's own saved settings, of which this command may change only `budget`."""
    if not args.resume:
        return args, None
    state = read_torch_file(args.resume, "--resume")
    saved = state.get("args") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or set(saved) != {f.name for f in fields(args)}:
        raise UserError(f"--resume {args.resume!r} is not a run state of {Path(__file__).name} (--save-every writes one)")
    defaults = type(args)()
    given = {f.name for f in fields(args) if getattr(args, f.name) != getattr(defaults, f.name)} - {"resume"}
    changed = [f"--{k.replace('_', '-')}" for k in sorted(given - set(budget)) if getattr(args, k) != saved[k]]
    if changed:
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in budget)
        raise UserError(f"--resume continues the run with its own settings; only {allowed} may change, not {changed[0]}")
    return replace(args, **{k: v for k, v in saved.items() if k not in given and k != "resume"}), state


# ---- end shared: resume ----


# ---- shared: load-checkpoint (identical in every finetuning DT script; tests/test_shared_blocks.py) ----
def load_model(path, device="cpu", dropout: float = 0.0, flag: str = "--checkpoint"):
    """(model, checkpoint dict) of a pretrain_dt.py or finetuned checkpoint; dropout is off in finetuning (Table 5)."""
    ckpt = read_torch_file(path, flag)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"{flag} {str(path)!r} is not a format-{CHECKPOINT_FORMAT_VERSION} pretrain_dt.py checkpoint")
    config = {k: v for k, v in ckpt["model_config"].items() if k not in ("activation", "c_offline")}
    arch = config.pop("arch", "dt")  # only a Reinformer's config names its arch
    if arch not in MODELS:
        raise UserError(f"{flag} {str(path)!r} holds a {arch} model; {Path(__file__).name} finetunes {sorted(MODELS)}")
    model = MODELS[arch](**{**config, "dropout": dropout})
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device), ckpt


def ensure_checkpoint(args) -> Path:
    """--checkpoint if given; else the default path, which pretrain_dt.py fills first if it is empty."""
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise UserError(f"--checkpoint {args.checkpoint!r} does not exist")
        return Path(args.checkpoint)
    path = default_checkpoint_path(args.env_id, args.dataset, args.seed, args.scale)
    if not path.exists():
        script = str(Path(__file__).resolve().parent / "pretrain_dt.py")
        cmd = [sys.executable, script, "--env-id", args.env_id, "--dataset", args.dataset, "--seed", str(args.seed)]
        cmd += ["--scale", args.scale, "--checkpoint", str(path), "--runs-dir", args.runs_dir]
        cmd += (["--dataset-path", args.dataset_path] if args.dataset_path else []) + shlex.split(args.pretrain_extra_args)
        print(f"{path} not found; pretraining it: {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0 or not path.exists():
            raise UserError(f"pretraining failed, no checkpoint at {path}")
    return path


# ---- end shared: load-checkpoint ----


# ---------------------------------------------------------------- algorithm pieces
@dataclass
class Policy:
    """The DT as rollouts act with it: raw states normalised, RTGs scaled, sigma x std_scale, noise drawn from `gen`."""

    model: nn.Module
    state_mean: torch.Tensor
    state_std: torch.Tensor
    rtg_scale: float
    std_scale: float
    gen: torch.Generator
    pad: bool = True  # CPU matmuls of under 16 rows round differently: padded to 16, an action does not depend on its batch

    def norm(self, obs) -> torch.Tensor:
        return (torch.as_tensor(obs, dtype=torch.float32, device=self.gen.device) - self.state_mean) / self.state_std

    def last(self, win) -> list:
        """The model's outputs at the last step of context windows (rtg, states, actions, mask)."""
        B = len(win[0])
        if self.pad and B < 16 and win[0].device.type == "cpu":
            win = [torch.cat([x, x[:1].expand(16 - B, *x.shape[1:])]) for x in win]
        return [x[:B, -1] for x in self.model(*win)]

    def __call__(self, win):
        """Mean and log-std of the action at the last step; a Reinformer first writes its RTG prediction into `win`."""
        if isinstance(self.model, Reinformer):
            win[0][:, -1] = self.last(win)[2]
        mean, log_std, *_ = self.last(win)
        return mean, log_std + math.log(self.std_scale)


def squashed_logprob(mean, log_std, u):
    """log pi(tanh(u)) summed over action dims, from the pre-tanh sample u (no atanh round trip near +-1)."""
    base = Normal(mean, log_std.exp(), validate_args=False).log_prob(u)
    return (base - TanhTransform().log_abs_det_jacobian(u, torch.tanh(u))).sum(-1)


@torch.inference_mode()
def rollout(policy: Policy, envs, win, n_sampled: int, n_mean: int, record_sim: bool = False) -> dict:
    """Members 0..N-1 in lockstep from windows `win`: n_sampled steps of tanh(u ~ N(mean, sigma)), n_mean of tanh(mean)."""
    N, T, A, device = len(win[0]), n_sampled + n_mean, policy.model.mean_head.out_features, policy.gen.device
    shapes = {"rtg": (), "states": win[1].shape[2:], "actions": (A,), "u": (A,), "mean": (A,), "log_std": (A,)}
    out, win = {k: win[1].new_zeros(N, T, *shape) for k, shape in shapes.items()}, [x.clone() for x in win]
    host, alive = {"reward": np.zeros((N, T)), "valid": np.zeros((N, T), bool)}, np.ones(N, bool)
    if record_sim:  # the simulator state before every step: the reset points of later groups
        host["sim"], host["elapsed"] = np.zeros((N, T, envs.get_states([0])[0].shape[1])), np.zeros((N, T), np.int64)
    for t in range(T):
        noise = torch.randn(N, A, generator=policy.gen, device=device) if t < n_sampled else torch.zeros(N, A, device=device)
        if not alive.any():
            break
        live = np.flatnonzero(alive)
        rows = torch.as_tensor(live, device=device)
        w = [x[rows] for x in win]
        mean, log_std = policy(w)
        u = mean + log_std.exp() * noise[rows]
        w[2][:, -1] = a = torch.tanh(u)
        for k, v in zip(out, (w[0][:, -1, 0], w[1][:, -1], a, u, mean, log_std)):
            out[k][rows, t] = v
        if not torch.isfinite(a).all():
            raise FloatingPointError("action")
        if record_sim:
            host["sim"][live, t], host["elapsed"][live, t] = envs.get_states(live)
        obs, reward, term, trunc = envs.step(live, a.cpu().numpy())
        host["reward"][live, t], host["valid"][live, t], alive[live] = reward, True, ~(term | trunc)
        w = [x.roll(-1, 1) for x in w]  # the next step's window, with its RTG and state last
        w[0][:, -1, 0] = out["rtg"][rows, t] - torch.as_tensor(reward * policy.rtg_scale, dtype=torch.float32, device=device)
        w[1][:, -1], w[2][:, -1], w[3][:, -1] = policy.norm(obs), 0.0, True
        for x, y in zip(win, w):
            x[rows] = y
    # all steps at once: elementwise kernels round by position in a batch, so this does not depend on who was alive
    valid, mean, log_std = torch.as_tensor(host["valid"], device=device), out.pop("mean"), out.pop("log_std")
    stats = {"logp": squashed_logprob(mean, log_std, out["u"]), "var": (2 * log_std).exp().mean(-1)}
    out |= {k: torch.where(valid, v, 0.0) for k, v in stats.items()}
    return {k: v.cpu().numpy() for k, v in out.items()} | host


def start_windows(policy: Policy, obs, rtg: float, c: int) -> list:
    """Context windows of fresh episodes: nothing before the first step, whose RTG is `rtg` (raw) and state `obs`."""
    s0 = policy.norm(obs)
    N, A = len(s0), policy.model.mean_head.out_features
    win = [s0.new_zeros(N, c, 1), s0.new_zeros(N, c, s0.shape[1]), s0.new_zeros(N, c, A), s0.new_zeros(N, c, dtype=bool)]
    win[0][:, -1], win[1][:, -1], win[3][:, -1] = rtg * policy.rtg_scale, s0, True
    return win


def window_at(traj: dict, h: int, c: int) -> list:
    """The c-token context window (left-padded) at step h of a stored episode, action h not taken yet."""
    lo = max(0, h - c + 1)
    actions = traj["actions"][lo : h + 1].copy()
    actions[-1] = 0
    parts = (traj["rtg"][lo : h + 1, None], traj["states"][lo : h + 1], actions, np.ones(h + 1 - lo, bool))
    return [np.concatenate([np.zeros((c - len(x), *x.shape[1:]), x.dtype), x]) for x in parts]


def returns_to_go(rewards, rtg_scale: float):
    return (np.cumsum(rewards[..., ::-1], -1)[..., ::-1] * rtg_scale).astype(np.float32)


def sample_reset_points(full_buffer, args: Args, rng) -> tuple:
    """Alg. 1 lines 3 and 5: (episode, step) of every group member, each of shape (trajs_per_iter * K, G)."""
    K, G, episodes, steps = args.reset_points, args.group_size, [], []
    lengths = np.array([len(t["reward"]) for t in full_buffer], np.float64)
    for b in rng.choice(len(lengths), args.trajs_per_iter, p=lengths / lengths.sum()):  # in proportion to length
        p = np.exp(full_buffer[b]["var"] - full_buffer[b]["var"].max())  # active sampling: softmax of the action variance
        p = np.full(len(p), 1.0 / len(p)) if args.reset_sampling == "uniform" else p / p.sum()
        shape = (K, 1) if args.consistent_reset else (K, G)  # a consistent group shares its reset point
        h = np.zeros((K, 1), np.int64) if args.full_trajectory else rng.choice(len(p), shape, p=p)
        steps.append(np.broadcast_to(h, (K, G)))
        episodes.append(np.full((K, G), b))
    return np.concatenate(episodes), np.concatenate(steps)


def group_advantages(rewards, delta_r: float):
    """Eq. 2 per group (row), and App. B.1's keep mask: members within delta_r of their group's mean are dropped."""
    mean, std = rewards.mean(1, keepdims=True), rewards.std(1, keepdims=True)
    return (rewards - mean) / (std + 1e-8), np.abs(rewards - mean) > delta_r


def collect_groups(policy: Policy, envs, full_buffer, args: Args, rng, rollout=rollout):
    """Alg. 1 lines 3-8: the kept members' buffer items, the (groups, G) rewards, the keep mask and the rollout."""
    c, L, G = args.c_online, args.subtraj_len, args.group_size
    b, h = (x.ravel() for x in sample_reset_points(full_buffer, args, rng))
    trajs = [full_buffer[i] for i in b]
    # line 6: each member starts from its reset point's exact simulator state and DT context; L_traj + L_eval steps
    snapshots = [(t["params"], t["sim"][j - 1] if j else None, t["sim"][j], t["elapsed"][j]) for t, j in zip(trajs, h)]
    envs.restore(range(len(h)), snapshots)
    win = [np.stack(x) for x in zip(*(window_at(t, j, c) for t, j in zip(trajs, h)))]
    out = rollout(policy, envs, [torch.as_tensor(x, device=policy.gen.device) for x in win], L, args.eval_len)
    # line 7: Eq. 2 on the discounted rewards (a member stops at termination), and the Delta_r filter
    steps = np.arange(out["reward"].shape[1])
    rewards = (out["reward"] * args.gamma**steps).sum(1).reshape(-1, G)
    adv, keep = (x.ravel() for x in group_advantages(rewards, args.delta_r))
    # line 8: the buffer items: reset context + the L_traj sampled steps' tokens, pre-tanh actions u, log-probs, advantage
    prefix, rtg, valid = [x[:, :-1] for x in win], out["rtg"][:, :L], out["valid"][:, :L]
    if args.relabel:  # achieved returns-to-go replace the RTG tokens the actions were sampled under
        hindsight = [t | {"rtg": returns_to_go(t["reward"], policy.rtg_scale)} for t in trajs]
        prefix[0] = np.stack([window_at(t, j, c)[0][:-1] for t, j in zip(hindsight, h)])
        rtg = returns_to_go(out["reward"], policy.rtg_scale)[:, :L]
    tokens = (rtg[..., None], out["states"][:, :L], out["actions"][:, :L], valid)
    items = {k: np.concatenate([p, x], 1) for k, p, x in zip(("rtg", "states", "actions", "mask"), prefix, tokens)}
    items |= dict(u=out["u"][:, :L], logp_old=out["logp"][:, :L], valid=valid, adv=adv)
    if args.train_rtg_head:  # the RTG head's targets: each sampled step's discounted return to the member's end
        discount = np.tril(args.gamma ** np.maximum(steps[:, None] - steps, 0))  # [j, t]: gamma^(j - t) for j >= t
        items["ret"] = out["reward"] @ discount[:, :L] * policy.rtg_scale
    return {k: v[keep] for k, v in items.items()}, rewards, keep, out | {"reset_step": h}


class SubtrajBuffer:
    """FIFO ring of sub-trajectories, tensors by key; uniform draws."""

    def __init__(self, capacity: int, device):
        self.data, self.capacity, self.device, self.ptr, self.size = {}, capacity, device, 0, 0

    def add(self, items: dict):
        n = min(len(items["adv"]), self.capacity)
        slots = (self.ptr + np.arange(n)) % self.capacity
        for k, v in items.items():
            dtype = torch.bool if v.dtype == bool else torch.float32
            self.data.setdefault(k, torch.zeros((self.capacity, *v.shape[1:]), dtype=dtype, device=self.device))
            self.data[k][slots] = torch.as_tensor(v[-n:], dtype=dtype, device=self.device)
        self.ptr, self.size = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity)

    def sample(self, n: int, rng) -> dict:
        i = torch.as_tensor(rng.integers(0, self.size, n), device=self.device)
        return {k: v[i] for k, v in self.data.items()}


def masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.to(x.dtype).sum(dim).clamp(min=1)


def sequence_ratio(logp, logp_old, valid, mode: str = "sequence"):
    """Eq. 3's pi_theta(tau) / pi_old(tau) over the real steps; GSPO's geometric mean or per-step ratios (ablations)."""
    diff = (logp - logp_old) * valid
    log_ratio = {"sequence": diff.sum(-1), "geometric": diff.sum(-1) / valid.sum(-1).clamp(min=1), "token": diff}[mode]
    return log_ratio.clamp(max=20).exp()  # capped at e^20 to stay finite


def grpo_loss(ratio, adv, valid, eps):
    """Eq. 3's clipped surrogate as a loss (a batch mean), and each sub-trajectory's fraction of clipped ratios."""
    adv = adv[:, None] if ratio.dim() == 2 else adv
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    clipped = ((ratio - 1).abs() > eps).float()
    if ratio.dim() == 2:  # token ratios: a mean over each sub-trajectory's real steps first
        surr, clipped = masked_mean(surr, valid, 1), masked_mean(clipped, valid, 1)
    return -surr.mean(), clipped


def subtraj_policy(model, batch, c: int, std_scale: float) -> list:
    """Mean and log-std (B, L, A) (a Reinformer's RTG prediction too) at every step of buffered sub-trajectories, each
    from its c-token window."""
    B, keys = batch["adv"].shape[0], ("rtg", "states", "actions", "mask")
    out = model(*(batch[k].unfold(1, c, 1).movedim(-1, 2).reshape(-1, c, *batch[k].shape[2:]) for k in keys))
    out = [x[:, -1].view(B, -1, x.shape[-1]) for x in out]
    return [out[0], out[1] + math.log(std_scale), *out[2:]]


def grpo_objective(model, ref_model, batch, args: Args):
    """Eq. 3's surrogate loss, KL(pi || pi_ref) and entropy (means over real steps); the ratios and clip fractions; with
    --train-rtg-head, the expectile loss of a Reinformer's RTG prediction (else 0)."""
    valid = batch["valid"]
    mean, log_std, *rtg_hat = subtraj_policy(model, batch, args.c_online, args.std_scale)
    ratio = sequence_ratio(squashed_logprob(mean, log_std, batch["u"]), batch["logp_old"], valid, args.ratio)
    pg_loss, clipped = grpo_loss(ratio, batch["adv"], valid, args.clip_coef)
    with torch.no_grad():
        ref_mean, ref_log_std, *_ = subtraj_policy(ref_model, batch, args.c_online, args.std_scale)
    # tanh is a bijection, so KL(pi || pi_ref) is the base Gaussians' KL
    pi, pi_ref = Normal(mean, log_std.exp(), validate_args=False), Normal(ref_mean, ref_log_std.exp(), validate_args=False)
    dist = squashed_gaussian(mean, log_std)  # a tanh-Gaussian's entropy has no closed form: one sample
    kl, entropy = masked_mean(kl_divergence(pi, pi_ref).sum(-1), valid), masked_mean(-dist.log_prob(dist.rsample()), valid)
    rtg_loss = expectile_loss(rtg_hat[0][..., 0], batch["ret"], valid, model.expectile) if args.train_rtg_head else 0.0
    return pg_loss, kl, entropy, ratio, clipped, rtg_loss


LOSSES = ("policy_loss", "kl", "entropy", "clipfrac", "kappa", "ratio_mean", "ratio_max")  # grpo_backward's stats


def grpo_backward(model, ref_model, batch, args: Args, kappa):
    """Backpropagate Eq. 3 with the entropy term; the entropy (for kappa's step) and stats."""
    pg_loss, kl, entropy, ratio, clipped, rtg_loss = grpo_objective(model, ref_model, batch, args)
    loss = pg_loss + args.kl_coef * kl - kappa * entropy + rtg_loss
    if not torch.isfinite(loss):
        raise FloatingPointError("loss")
    loss.backward()
    stats = dict(policy_loss=pg_loss.item(), kl=kl.item(), entropy=entropy.item(), clipfrac=clipped.mean().item())
    if args.train_rtg_head:
        stats["rtg_loss"] = rtg_loss.item()
    return entropy.detach(), stats | dict(kappa=float(kappa), ratio_mean=ratio.mean().item(), ratio_max=ratio.max().item())


# ---------------------------------------------------------------- run state
class RunState:
    """What --resume restores bit-exactly besides the model: pi_ref, kappa and optimisers, both buffers, rngs, counters."""

    PLAIN, MODULES = ("iteration", "env_steps", "grad_updates", "run_name", "score"), ("ref_model", "optimizer", "kappa_opt")

    def __init__(self, model, args: Args, gen: torch.Generator, run_name: str):
        self.model, self.ref_model, self.gen, self.rng = model, copy.deepcopy(model), gen, np.random.default_rng(args.seed)
        self.log_kappa = torch.tensor(math.log(args.kappa_initial), device=gen.device, requires_grad=True)
        self.optimizer = Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.kappa_opt = torch.optim.Adam([self.log_kappa], lr=args.kappa_lr)
        self.full_buffer = deque(maxlen=args.full_buffer_size)
        self.sub_buffer = SubtrajBuffer(args.subtraj_buffer_size, gen.device)
        self.iteration, self.env_steps, self.grad_updates, self.run_name, self.score = 0, 0, 0, run_name, float("nan")

    def state_dict(self) -> dict:
        b = self.sub_buffer
        out = {k: getattr(self, k) for k in self.PLAIN} | {k: getattr(self, k).state_dict() for k in self.MODULES}
        out |= dict(log_kappa=self.log_kappa.item(), rng=self.rng.bit_generator.state, gen=self.gen.get_state())
        out |= dict(torch_rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all())  # rsample draws from these
        out |= dict(full_buffer=list(self.full_buffer), sub_buffer={k: v.cpu() for k, v in b.data.items()})
        return out | dict(sub_ptr=b.ptr, sub_size=b.size)

    def load_state_dict(self, ft: dict):
        for k in self.PLAIN:
            setattr(self, k, ft[k])
        for k in self.MODULES:
            getattr(self, k).load_state_dict(ft[k])
        with torch.no_grad():
            self.log_kappa.fill_(ft["log_kappa"])
        self.full_buffer.extend(ft["full_buffer"])
        b = self.sub_buffer
        b.data, b.ptr, b.size = {k: v.to(b.device) for k, v in ft["sub_buffer"].items()}, ft["sub_ptr"], ft["sub_size"]
        self.rng.bit_generator.state = ft["rng"]
        self.gen.set_state(ft["gen"])
        torch.set_rng_state(ft["torch_rng"])
        torch.cuda.set_rng_state_all(ft["cuda_rng"])


def save(path, ckpt: dict, st: RunState, args: Args, run_state: bool = True):
    """The finetuned DT as a checkpoint `load_model` reads; with `run_state`, also what --resume reads."""
    out = {k: v for k, v in ckpt.items() if k not in ("args", "finetune", "finetune_args")}
    out |= {"state_dict": {k: v.detach().cpu() for k, v in st.model.state_dict().items()}, "eval_normalized_score": st.score}
    out |= {"args": asdict(args), "finetune": st.state_dict()} if run_state else {"finetune_args": asdict(args)}
    save_atomic(path, out)


def evaluate(policy: Policy, envs: Envs, args: Args, ckpt: dict, max_steps: int) -> dict:
    """Deterministic tanh(mean) episodes at --eval-rtg with context --eval-context-len."""
    obs, _ = envs.reset(range(args.eval_episodes), eval_seeds(args.seed, args.eval_episodes))
    win = start_windows(policy, obs, args.eval_rtg, args.eval_context_len)
    out = rollout(replace(policy, pad=False), envs, win, 0, max_steps)  # unpadded, as pretrain_dt.py scores the checkpoint
    rets = out["reward"].sum(1)
    scores = 100 * (rets - ckpt["ref_min_score"]) / (ckpt["ref_max_score"] - ckpt["ref_min_score"])
    ev = dict(normalized_score=scores.mean(), normalized_score_se=scores.std() / np.sqrt(len(scores)), eval_return=rets.mean())
    return {k: float(v) for k, v in (ev | {"eval_length": out["valid"].sum(1).mean()}).items()}


# ---------------------------------------------------------------- main
def main(args: Args, make_envs=Envs, rollout=rollout, backward=grpo_backward) -> float:
    launched = time.time()  # --max-seconds counts from here
    args, resumed = resume_args(args, ("num_iterations", "total_env_steps", "max_seconds"))
    check(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = resumed["finetune"]["run_name"] if resumed else run_name  # a resumed run keeps its TensorBoard run
    eval_envs = Envs(args, args.eval_episodes, video_dir=f"videos/{run_name}" if args.capture_video else None)
    env = eval_envs.envs[-1]
    S, A, T_max = env.observation_space.shape[0], env.action_space.shape[0], env.spec.max_episode_steps
    apply_presets(args, A, T_max)
    device = seed_everything(args)
    envs = make_envs(args, max(args.trajs_per_iter * args.reset_points * args.group_size, args.full_trajs_per_iter))
    model, ckpt = load_model(args.resume or ensure_checkpoint(args), device)
    if (ckpt["model_config"]["state_dim"], ckpt["model_config"]["act_dim"]) != (S, A):
        raise UserError(f"the checkpoint's state/action dims are not {args.env_id}'s {S, A}: {ckpt['model_config']}")
    if args.train_rtg_head and not isinstance(model, Reinformer):
        raise UserError("--train-rtg-head trains a Reinformer's RTG prediction; the checkpoint holds a dt model")
    args.eval_rtg = ckpt["eval_rtg"] if args.eval_rtg is None else args.eval_rtg
    gen, mean, std = torch.Generator(device=device).manual_seed(args.seed), ckpt["state_mean"], ckpt["state_std"]
    policy = Policy(model.eval(), mean.to(device), std.to(device), ckpt["rtg_scale"], args.std_scale, gen)
    st = RunState(model, args, gen, run_name)
    if resumed:
        st.load_state_dict(resumed["finetune"])
    state_path = Path(args.save_path or f"{args.runs_dir}/{run_name}/state.pt")
    if args.save_every:
        print(f"run state (for --resume): {state_path}", flush=True)
    writer = make_writer(args, run_name, purge_step=st.iteration + 1 if resumed else None)
    iteration, start, steps0 = st.iteration, time.time(), st.env_steps
    pbar = tqdm(desc="grpo-dt", initial=st.iteration, total=max(args.num_iterations, st.iteration))
    try:
        if not resumed:  # iteration 0: the pretrained policy
            ev = evaluate(policy, eval_envs, args, ckpt, T_max)
            for k, v in ev.items():
                writer.add_scalar(f"charts/{k}", v, 0)
            st.score = ev["normalized_score"]
        for iteration in range(st.iteration + 1, args.num_iterations + 1):
            # ALGO LOGIC: Alg. 1 line 2, full trajectories from g_online, with the simulator state before every step
            obs, params = envs.reset(range(args.full_trajs_per_iter), train_seeds(st.rng, args.full_trajs_per_iter))
            full = rollout(policy, envs, start_windows(policy, obs, args.g_online, args.c_online), T_max, 0, record_sim=True)
            for m, p in enumerate(params):  # the full buffer keeps whole episodes
                st.full_buffer.append({k: v[m, : full["valid"][m].sum()] for k, v in full.items()} | {"params": p})

            # ALGO LOGIC: lines 3-8, G sub-trajectories from each of K reset points per drawn trajectory, Eq. 2 advantages
            items, rewards, keep, groups = collect_groups(policy, envs, st.full_buffer, args, st.rng, rollout)
            st.env_steps += int(full["valid"].sum()) + int(groups["valid"].sum())
            st.sub_buffer.add(items)

            # ALGO LOGIC: line 9, Eq. 3 on n_batch uniform draws from the buffer; kappa is the entropy constraint's dual
            stats = []
            for _ in range(args.updates_per_iter if st.sub_buffer.size else 0):
                kappa = st.log_kappa.exp()
                batch = st.sub_buffer.sample(args.n_batch, st.rng)
                st.optimizer.zero_grad()
                entropy, step_stats = backward(model, st.ref_model, batch, args, kappa.detach())
                nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                st.optimizer.step()
                st.kappa_opt.zero_grad()
                (kappa * (entropy - args.target_entropy)).backward()
                st.kappa_opt.step()
                st.grad_updates += 1
                if st.grad_updates % args.ref_update_every == 0:
                    st.ref_model.load_state_dict(model.state_dict())
                stats.append(step_stats)

            ev = evaluate(policy, eval_envs, args, ckpt, T_max)
            st.iteration, st.score = iteration, ev["normalized_score"]
            ev |= dict(SPS=(st.env_steps - steps0) / (time.time() - start), grad_updates=st.grad_updates)
            ev |= dict(env_steps=st.env_steps, episodic_return=full["reward"].sum(1).mean())
            ev |= dict(episodic_length=full["valid"].sum(1).mean(), reset_step_mean=groups["reset_step"].mean())
            ev |= dict(reset_step_max=groups["reset_step"].max(), learning_rate=st.optimizer.param_groups[0]["lr"])
            losses = dict(group_reward_std=rewards.std(1).mean(), dropped_fraction=1 - keep.mean())
            logged = LOSSES + ("rtg_loss",) * args.train_rtg_head
            losses |= {k: (max if k == "ratio_max" else np.mean)([s[k] for s in stats]) if stats else np.nan for k in logged}
            for k, v in ({f"charts/{k}": v for k, v in ev.items()} | {f"losses/{k}": v for k, v in losses.items()}).items():
                writer.add_scalar(k, v, iteration)
            pbar.set_postfix(score=f"{st.score:.1f}", env_steps=st.env_steps)
            done = iteration == args.num_iterations or 0 < args.total_env_steps <= st.env_steps
            done = done or 0 < args.max_seconds <= time.time() - launched
            if args.save_every and (iteration % args.save_every == 0 or done):
                save(state_path, ckpt, st, args)
            pbar.update()
            if done:
                pbar.total = pbar.n  # a budget may stop the run before --num-iterations
                break
    except FloatingPointError as e:
        raise UserError(f"non-finite {e} at iteration {iteration}; stopped, last good state kept at {state_path}") from None
    pbar.close()
    if args.save_model:
        save(state_path.parent / f"{args.exp_name}.pt", ckpt, st, args, run_state=False)
    for closable in (envs, eval_envs, writer):
        closable.close()
    print(f"final normalized score {st.score:.1f} after {st.iteration} iterations, {st.env_steps} env steps")
    return st.score


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
