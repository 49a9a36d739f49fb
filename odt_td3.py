"""ODT and ODT+TD3: online finetuning of pretrain_dt.py's Decision Transformer by hindsight-relabeled supervised learning
(ODT), plus TD3 gradients from a twin critic (ODT+TD3, Yan et al. 2024, "RL gradients as vitamin"): the baselines of
"Online Finetuning Decision Transformers with Pure RL Gradients", Sections 2 and 3.1, Appendix B.1.

    python odt_td3.py --env-id Hopper-v4 --dataset medium --algo odt_td3
"""

import contextlib
import copy
import ctypes
import os
import random
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import h5py
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Independent, Normal, TanhTransform, TransformedDistribution
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
    scale: Literal["paper", "cpu"] = "paper"  # size of the DT pretrained if the checkpoint is missing (cpu: 128x2)
    algo: Literal["odt_td3", "odt"] = "odt_td3"  # odt_td3 (actor + TD3 critic gradients) or odt (NLL + entropy)
    rl_coef: float = 0.1  # alpha, weight of mean(-Q1(s, a_pred)) in the odt_td3 actor loss (Yan et al.); --algo odt uses 0
    num_iterations: int = 300  # iterations of rollouts, updates, evaluation (0: only evaluate the checkpoint)
    total_env_steps: int = 0  # training env-step budget (0: none); the run stops after the iteration that reaches it
    max_seconds: float = 0  # stop after the iteration where the seconds since launch reach this (0: no budget)
    actor_updates: int = 300  # DT (actor) updates per iteration
    critic_updates: Optional[int] = None  # critic updates per iteration (actor every 2nd); default 600 MuJoCo, else 300
    critic_pretrain_updates: Optional[int] = None  # offline critic updates, DT frozen (10k MuJoCo, 40k Adroit, 200k AntMaze)
    n_batch: int = 256  # segments per update (actor and critic)
    c_online: Optional[int] = None  # rollout context; default 5 MuJoCo and pen, 1 door, hammer, AntMaze
    learning_rate: float = 1e-4  # LAMB learning rate of the DT
    weight_decay: Optional[float] = None  # LAMB weight decay; default 5e-4 Hopper, 1e-3 Walker2d, 1e-4 otherwise
    max_grad_norm: float = 0.25  # DT gradient-norm clip
    dropout: float = 0.1  # DT dropout in the updates; rollouts, TD targets and evaluation run without
    kappa_lr: float = 1e-4  # Adam lr of log(kappa), ODT's temperature (--algo odt), from the checkpoint
    critic_lr: Optional[float] = None  # AdamW lr of the critic; default 1e-3 MuJoCo, 2e-4 otherwise
    gamma: Optional[float] = None  # discount; default 0.99, 0.998 AntMaze
    tau: float = 0.005  # Polyak rate of the target DT and target critic
    explore_noise: float = 0.1  # std of the Gaussian exploration noise on tanh(mean) (odt_td3 rollouts)
    policy_noise: float = 0.2  # std of TD3's target-policy smoothing noise
    noise_clip: float = 0.5  # clip of the target-policy smoothing noise
    g_online: Optional[float] = None  # RTG of the training rollouts; default ODT's (Hopper 7200, door 3000, ...)
    replay_size: Optional[int] = None  # trajectories in the replay buffer; default 1000 MuJoCo, 5000 Adroit, 2000 AntMaze
    min_steps_per_iter: Optional[int] = None  # env steps per iteration at least (1000 Adroit, AntMaze, random; else 0)
    max_episode_steps: Optional[int] = None  # cap on the env's time limit, for rollouts and evaluation; default the env's own
    save_every: int = 5  # write the run state every this many iterations and at the end (0: never)
    save_path: Optional[str] = None  # where the run state goes; default `{runs_dir}/{run_name}/state.pt`
    save_model: bool = False  # at the end, write the DT as a checkpoint to {runs_dir}/{run_name}/{exp_name}.pt
    resume: Optional[str] = None  # continue a run state; only --num-iterations, --total-env-steps, --max-seconds may change


# ---------------------------------------------------------------- envs and data
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


G_ONLINE = dict(hopper=7200, walker2d=10000, ant=12000, halfcheetah=12000, door=3000, hammer=4000, pen=6000, antmaze=2)
# ODT+TD3's settings (Yan et al.'s defaults and README commands) per env family, then the per-env exceptions.
PRESET_FIELDS = "c_online replay_size min_steps_per_iter critic_pretrain_updates critic_updates critic_lr gamma"
PRESETS = dict(
    mujoco=(5, 1000, 0, 10_000, 600, 1e-3, 0.99),
    adroit=(1, 5000, 1000, 40_000, 300, 2e-4, 0.99),
    antmaze=(1, 2000, 1000, 200_000, 300, 2e-4, 0.998),
)
PER_ENV = dict(hopper=dict(weight_decay=5e-4), walker2d=dict(weight_decay=1e-3), pen=dict(c_online=5))
CRITIC_REWARD = dict(hammer=(0, 1000), door=(0, 100), pen=(0, 100), antmaze=(1, 1))  # (r - shift) / scale (Yan et al.)


def apply_presets(args: Args) -> Args:
    """The env's ODT+TD3 settings for every flag left at None, then the one check of what would break a run."""
    family, key = env_family(args.env_id)
    presets = dict(zip(PRESET_FIELDS.split(), PRESETS[family]), g_online=G_ONLINE[key], weight_decay=1e-4)
    presets |= PER_ENV.get(key, {})
    if family == "mujoco" and "random" in args.dataset:
        presets["min_steps_per_iter"] = 1000
    args = replace(args, **{k: v for k, v in presets.items() if getattr(args, k) is None})
    args = replace(args, eval_context_len=args.eval_context_len or args.c_online)
    positive = ("n_batch", "eval_episodes", "replay_size", "c_online", "eval_context_len", "actor_updates")
    positive += ("max_episode_steps", "learning_rate", "critic_lr", "kappa_lr", "max_grad_norm")
    nonnegative = ("num_iterations", "total_env_steps", "max_seconds", "critic_updates", "critic_pretrain_updates", "rl_coef")
    check_args(args, positive=positive, nonnegative=nonnegative, unit=("gamma", "tau", "dropout"))
    return args


def load_offline_trajectories(ckpt: dict) -> list[dict]:
    """The pretraining data, with the T+1-th observation the other loaders drop (a time-limit end bootstraps from it)."""
    family, path, trajs = env_family(ckpt["env_id"])[0], ckpt["pretrain_args"]["dataset_path"], []
    if path:
        with h5py.File(path, "r") as f:
            keys = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")
            d = {k: f[k][()] for k in keys if k in f}
        ends = np.unique(np.r_[np.flatnonzero(d["terminals"] | d["timeouts"]) + 1, len(d["rewards"])])
        nxt = d.get("next_observations", d["observations"])  # without next_observations the last obs is repeated
        for a, b in zip(np.r_[0, ends[:-1]], ends):
            obs, done = np.concatenate([d["observations"][a:b], nxt[b - 1 : b]]), bool(d["terminals"][b - 1])
            trajs.append(dict(observations=obs, actions=d["actions"][a:b], rewards=d["rewards"][a:b], terminated=done))
    else:
        if ckpt["dataset_id"] not in minari.list_local_datasets():
            raise UserError(f"the checkpoint's dataset {ckpt['dataset_id']!r} is not under MINARI_DATASETS_PATH")
        for ep in minari.load_dataset(ckpt["dataset_id"]).iterate_episodes():
            obs = flatten_antmaze_obs(ep.observations) if family == "antmaze" else ep.observations
            trajs.append(dict(observations=obs, actions=ep.actions, rewards=ep.rewards, terminated=bool(ep.terminations[-1])))
    if family == "antmaze":
        trajs = [t for t in trajs if len(t["rewards"]) > 1]  # as pretraining: 1-step trajectories dropped
    return [{**t, **{k: np.asarray(t[k], np.float32) for k in ("observations", "actions", "rewards")}} for t in trajs]


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


MODELS = {"dt": DecisionTransformer}  # what `load_model` builds, by the checkpoint's arch


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


class TwinCritic(nn.Module):
    """TD3's twin Q: (s, a) -> 256 -> 256 -> 1 with ReLU (ODT+TD3); non-affine LayerNorm outside MuJoCo."""

    def __init__(self, state_dim, act_dim, hidden=256, layer_norm=False):
        super().__init__()
        norm = partial(nn.LayerNorm, hidden, elementwise_affine=False) if layer_norm else nn.Identity
        d, h = state_dim + act_dim, hidden
        q = [[nn.Linear(d, h), norm(), nn.ReLU(), nn.Linear(h, h), norm(), nn.ReLU(), nn.Linear(h, 1)] for _ in range(2)]
        self.q1, self.q2 = nn.Sequential(*q[0]), nn.Sequential(*q[1])

    def forward(self, states, actions):
        x = torch.cat([states, actions], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


# ---------------------------------------------------------------- algorithm pieces
@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float):
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)


def masked_mean(x, mask):
    return (x * mask.float()).sum() / mask.float().sum().clamp(min=1)


def flatten_buffer(trajs, ckpt):
    """Rows of steps, each trajectory closed by its last observation (zero action, RTG, reward): row i + 1 follows i."""

    def closed(xs):
        return np.concatenate([np.concatenate([x, np.zeros((1, *x.shape[1:]))]) for x in xs]).astype(np.float32)

    lengths = np.array([len(t["rewards"]) for t in trajs])
    terminal = [np.arange(n + 1) == (n - 1 if t["terminated"] else -1) for n, t in zip(lengths, trajs)]
    flat = dict(lengths=lengths, offsets=np.r_[0, np.cumsum(lengths + 1)[:-1]], terminals=np.concatenate(terminal))
    states = (np.concatenate([t["observations"] for t in trajs]) - ckpt["state_mean"].numpy()) / ckpt["state_std"].numpy()
    flat["states"], flat["actions"] = states.astype(np.float32), closed(t["actions"] for t in trajs)
    # Hindsight relabeling: the RTG token at t is the achieved return from t on, whatever RTG the rollout had
    flat["rtg"] = closed(np.cumsum(t["rewards"].astype(np.float64)[::-1])[::-1] * ckpt["rtg_scale"] for t in trajs)
    shift, scale = CRITIC_REWARD.get(env_family(ckpt["env_id"])[1], (0, 1))
    flat["rewards"] = closed((t["rewards"] - shift) / scale for t in trajs)
    return flat


def sample_segments(flat, context_len, batch_size, rng, device):
    """ODT's left-padded segments, and the same segments one step later (the target DT's context for next actions)."""
    K, lengths = context_len, flat["lengths"]
    idx = rng.choice(len(lengths), size=batch_size, p=lengths / lengths.sum())
    start = (rng.random(batch_size) * lengths[idx]).astype(np.int64)
    pad = K - np.minimum(K, lengths[idx] - start)
    mask = np.arange(K)[None, :] >= pad[:, None]
    src = flat["offsets"][idx, None] + start[:, None] + np.where(mask, np.arange(K)[None, :] - pad[:, None], 0)

    def take(key, rows):
        x = flat[key][rows]
        return torch.as_tensor(np.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), x, 0), device=device)

    batch = {k: take(k, src) for k in ("states", "actions", "rewards", "terminals")}
    batch.update({"next_" + k: take(k, src + 1) for k in ("states", "actions", "rtg")})
    batch["rtg"], batch["next_rtg"] = take("rtg", src)[..., None], batch["next_rtg"][..., None]
    return batch | {"mask": torch.as_tensor(mask, device=device)}


def critic_loss(critic, target_critic, target_model, batch, gamma, policy_noise, noise_clip):
    """TD3's per-token loss; the target DT acts on the shifted context, and only a true termination cuts the bootstrap."""
    with torch.no_grad():
        mean, _ = target_model(batch["next_rtg"], batch["next_states"], batch["next_actions"], batch["mask"])
        noise = (torch.randn_like(mean) * policy_noise).clamp(-noise_clip, noise_clip)
        q1_next, q2_next = target_critic(batch["next_states"], (torch.tanh(mean) + noise).clamp(-1.0, 1.0))
        y = batch["rewards"] + gamma * (1.0 - batch["terminals"].float()) * torch.min(q1_next, q2_next)
    q1, q2 = critic(batch["states"], batch["actions"])
    return masked_mean((q1 - y) ** 2 + (q2 - y) ** 2, batch["mask"]), masked_mean(q1, batch["mask"]).detach()


def actor_loss(model, critic, batch, algo, rl_coef, temperature, margin, censor_bound):
    """odt_td3: MSE(tanh(mean), a) + rl_coef * mean(-Q1(s, tanh(mean))); odt: NLL - temperature * entropy."""
    mean, log_std = model(batch["rtg"], batch["states"], batch["actions"], batch["mask"])
    mask, a_pred = batch["mask"], torch.tanh(mean)
    if algo == "odt":
        nll = masked_mean(-action_log_prob(mean, log_std, batch["actions"], margin, censor_bound), mask)
        dist = squashed_gaussian(mean, log_std)
        entropy = masked_mean(-dist.log_prob(dist.rsample()), mask)
        sup = nll - temperature.detach() * entropy
        return sup, dict(sup_loss=sup.detach(), nll=nll.detach(), entropy=entropy)
    sup = masked_mean(((a_pred - batch["actions"]) ** 2).mean(-1), mask)
    rl = masked_mean(-critic(batch["states"], a_pred)[0], mask)
    return sup + rl_coef * rl, dict(sup_loss=sup.detach(), rl_loss=rl.detach())


@torch.no_grad()
def rollout(model, envs, seeds, ckpt, target_return, context_len, mode, noise=0.0, check=None):
    """One episode per env in lockstep; acts tanh(mean) (mode "eval"), plus noise ("odt_td3") or sampled ("odt")."""
    model.eval()
    device, n, K, scale = next(model.parameters()).device, len(envs), context_len, ckpt["rtg_scale"]
    state_mean, state_std = ckpt["state_mean"].to(device), ckpt["state_std"].to(device)
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]).astype(np.float32)
    act_dim = envs[0].action_space.shape[0]
    states, actions = torch.zeros(n, K, obs.shape[1], device=device), torch.zeros(n, K, act_dim, device=device)
    rtg, mask = torch.zeros(n, K, 1, device=device), torch.zeros(n, K, dtype=torch.bool, device=device)
    target = torch.full((n,), target_return * scale, device=device)
    trajs = [dict(observations=[o.copy()], actions=[], rewards=[], terminated=False) for o in obs]  # `obs` is reused
    alive = np.ones(n, dtype=bool)
    while alive.any():
        states, actions, rtg, mask = (x.roll(-1, dims=1) for x in (states, actions, rtg, mask))
        states[:, -1] = (torch.as_tensor(obs, device=device) - state_mean) / state_std
        rtg[:, -1, 0], actions[:, -1], mask[:, -1] = target, 0.0, True
        mean, log_std = (x[:, -1] for x in model(rtg, states, actions, mask))
        if check is not None:
            check(mean + log_std)  # before sampling: a NaN scale would crash torch.normal
        a = squashed_gaussian(mean, log_std).sample() if mode == "odt" else torch.tanh(mean)
        actions[:, -1] = (a + noise * torch.randn_like(a)).clamp(-1.0, 1.0) if mode == "odt_td3" else a
        act_np = actions[:, -1].cpu().numpy()
        for i in np.flatnonzero(alive):
            obs[i], r, term, trunc, _ = envs[i].step(act_np[i])
            t = trajs[i]
            t["observations"].append(obs[i].copy()), t["actions"].append(act_np[i]), t["rewards"].append(float(r))
            target[i] -= r * scale
            alive[i], t["terminated"] = not (term or trunc), bool(term)
    model.train()
    arrays = ("observations", "actions", "rewards")
    return [{**t, **{k: np.asarray(t[k], np.float32) for k in arrays}, "return": float(np.sum(t["rewards"]))} for t in trajs]


def evaluate(args: Args, model, ckpt: dict, envs: list) -> dict:
    kw = dict(target_return=args.eval_rtg, context_len=args.eval_context_len, mode="eval")
    rets = np.array([t["return"] for t in rollout(model, envs, eval_seeds(args.seed, len(envs)), ckpt=ckpt, **kw)])
    score = float(np.mean(100.0 * (rets - ckpt["ref_min_score"]) / (ckpt["ref_max_score"] - ckpt["ref_min_score"])))
    return dict(eval_return=float(rets.mean()), normalized_score=score)


# ---------------------------------------------------------------- run state
STATEFUL = ("optimizer", "temperature_opt", "critic", "critic_opt", "target_model", "target_critic")  # by state_dict
COUNTERS = ("iteration", "env_steps", "grad_updates", "buffer", "buffer_next", "rng")  # as they are


def make_learner(args: Args, model: DecisionTransformer, ckpt: dict, device) -> dict:
    """What the updates change and --resume restores; log(kappa) and the DT come back from the run state's checkpoint."""
    log_temperature = torch.tensor(float(ckpt["log_temperature"]), device=device, requires_grad=True)
    cfg = ckpt["model_config"]
    critic = TwinCritic(cfg["state_dim"], cfg["act_dim"], layer_norm=env_family(args.env_id)[0] != "mujoco").to(device)
    return dict(
        model=model,
        log_temperature=log_temperature,
        optimizer=Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay),
        temperature_opt=torch.optim.Adam([log_temperature], lr=args.kappa_lr),
        critic=critic,
        critic_opt=torch.optim.AdamW(critic.parameters(), lr=args.critic_lr),
        target_model=copy.deepcopy(model).requires_grad_(False).eval(),  # TD targets without dropout
        target_critic=copy.deepcopy(critic).requires_grad_(False),
        **dict(iteration=0, env_steps=0, grad_updates=0, buffer=[], buffer_next=0, rng=np.random.default_rng(args.seed)),
    )


def update(args: Args, ckpt: dict, L: dict, n_crit: int, n_act: int, desc: Optional[str] = None) -> dict:
    """n_crit critic and n_act actor updates on the same batches (the actor on every n_crit/n_act-th batch)."""
    stats, n, device, flat = {}, max(n_crit, n_act), L["log_temperature"].device, flatten_buffer(L["buffer"], ckpt)
    for i in tqdm(range(n), desc=desc, disable=desc is None, leave=False, mininterval=2.0):
        batch, logs = sample_segments(flat, ckpt["model_config"]["c_offline"], args.n_batch, L["rng"], device), {}
        if i < n_crit:  # ALGO LOGIC: TD3 critic step
            kw = dict(gamma=args.gamma, policy_noise=args.policy_noise, noise_clip=args.noise_clip)
            loss, logs["q_values"] = critic_loss(L["critic"], L["target_critic"], L["target_model"], batch, **kw)
            L["critic_opt"].zero_grad()
            loss.backward()
            L["critic_opt"].step()
            polyak_update(L["target_critic"], L["critic"], args.tau)
            logs["critic_loss"], L["grad_updates"] = loss, L["grad_updates"] + 1
        if (i + 1) * n_act // n > i * n_act // n:  # ALGO LOGIC: actor step
            kw = dict(temperature=L["log_temperature"].exp(), margin=ckpt["action_margin"], censor_bound=ckpt["censor_bound"])
            loss, info = actor_loss(L["model"], L["critic"], batch, algo=args.algo, rl_coef=args.rl_coef, **kw)
            L["optimizer"].zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(L["model"].parameters(), args.max_grad_norm)
            L["optimizer"].step()
            if args.algo == "odt_td3":
                polyak_update(L["target_model"], L["model"], args.tau)
            else:  # ODT's dual step toward the target entropy
                L["temperature_opt"].zero_grad()
                (L["log_temperature"].exp() * (info["entropy"] - ckpt["target_entropy"]).detach()).backward()
                L["temperature_opt"].step()
            logs, L["grad_updates"] = logs | info, L["grad_updates"] + 1
        for k, v in logs.items():
            stats.setdefault(k, []).append(v.detach())
    return {k: torch.stack(v).mean().item() for k, v in stats.items()}


def model_checkpoint(L: dict, ckpt: dict, score: float) -> dict:
    """The finetuned DT in the pretrained checkpoint's format, with the learned temperature."""
    state_dict = {k: v.detach().cpu() for k, v in L["model"].state_dict().items()}
    ckpt = {k: v for k, v in ckpt.items() if k not in ("finetune", "args")}
    return ckpt | dict(state_dict=state_dict, log_temperature=L["log_temperature"].item(), eval_normalized_score=score)


def check_finite(it: int, state_path: Path, what: str, x):
    """Stop before a non-finite value can be saved: the last good run state on disk is left as it is."""
    if not torch.isfinite(torch.as_tensor(x, dtype=torch.float64)).all():
        kept = f"last good state kept at {state_path}" if state_path.exists() else "no state saved yet"
        raise UserError(f"non-finite {what} at iteration {it}; stopped, {kept}")


# ---------------------------------------------------------------- main
def main(args: Args):
    t_launch = time.time()  # --max-seconds counts from here, loading included
    args, state = resume_args(args, ("num_iterations", "total_env_steps", "max_seconds"))
    args = apply_presets(args)
    ckpt_path = args.resume or ensure_checkpoint(args)
    device = seed_everything(args)
    model, ckpt = load_model(ckpt_path, device, dropout=args.dropout)
    if ckpt["env_id"] != args.env_id:
        raise UserError(f"--checkpoint {str(ckpt_path)!r} is for {ckpt['env_id']}, not --env-id {args.env_id}")
    args.eval_rtg = ckpt["eval_rtg"] if args.eval_rtg is None else args.eval_rtg
    run_name = state["finetune"]["run_name"] if state else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(t_launch)}"
    state_path = Path(args.save_path or f"{args.runs_dir}/{run_name}/state.pt")
    if args.save_every:
        print(f"run state: {state_path} (continue with --resume {state_path})", flush=True)
    writer = make_writer(args, run_name, purge_step=state["finetune"]["iteration"] + 1 if state else None)
    env_kw = dict(max_episode_steps=args.max_episode_steps)
    train_env, *eval_envs = (make_env(args.env_id, **env_kw) for _ in range(args.eval_episodes + 1))
    if args.capture_video:
        eval_envs[0] = gym.wrappers.RecordVideo(make_env(args.env_id, render_mode="rgb_array", **env_kw), f"videos/{run_name}")

    # Iteration 0: the loaded checkpoint, before any update; then the replay buffer from the offline data
    L, history = make_learner(args, model, ckpt, device), []
    if state:
        for k in STATEFUL:
            L[k].load_state_dict(state["finetune"][k])
        L.update({k: state["finetune"][k] for k in COUNTERS})
        torch.set_rng_state(state["finetune"]["torch_rng"])
        if state["finetune"]["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["finetune"]["cuda_rng"])
    else:
        history.append(dict(iteration=0, **evaluate(args, model, ckpt, eval_envs)))
        for k in ("eval_return", "normalized_score"):
            writer.add_scalar(f"charts/{k}", history[0][k], 0)
        print(f"iteration 0 (the checkpoint): normalized score {history[0]['normalized_score']:.1f}")
    if not state and args.num_iterations > 0:  # ODT's replay: the best offline trajectories, worst first
        L["buffer"] = sorted(load_offline_trajectories(ckpt), key=lambda t: float(t["rewards"].sum()))[-args.replay_size :]
        if args.algo == "odt_td3":  # ALGO LOGIC: critic pretraining on the offline data, the pretrained DT frozen
            stats = update(args, ckpt, L, args.critic_pretrain_updates, 0, desc="critic pretraining")
            check_finite(0, state_path, "loss", list(stats.values()))

    roll = dict(ckpt=ckpt, target_return=args.g_online, context_len=args.c_online, mode=args.algo, noise=args.explore_noise)
    start, steps_at_start = time.time(), L["env_steps"]
    pbar = tqdm(desc=args.algo, initial=L["iteration"], total=args.num_iterations)
    for it in range(L["iteration"] + 1, args.num_iterations + 1):
        # ALGO LOGIC: rollouts with exploration into the FIFO buffer, until the iteration has --min-steps-per-iter steps
        check, steps_before, returns = partial(check_finite, it, state_path, "action"), L["env_steps"], []
        while not returns or L["env_steps"] - steps_before < args.min_steps_per_iter:
            (traj,) = rollout(model, [train_env], train_seeds(L["rng"], 1), check=check, **roll)
            if len(L["buffer"]) < args.replay_size:
                L["buffer"].append(traj)
            else:  # FIFO: the worst offline trajectory goes first, as the buffer starts sorted by return
                L["buffer"][L["buffer_next"]], L["buffer_next"] = traj, (L["buffer_next"] + 1) % args.replay_size
            L["env_steps"] += len(traj["rewards"])
            returns.append(float(traj["rewards"].sum()))

        # ALGO LOGIC: critic and actor updates on relabeled segments
        stats = update(args, ckpt, L, args.critic_updates if args.algo == "odt_td3" else 0, args.actor_updates)
        check_finite(it, state_path, "loss", list(stats.values()))
        L["iteration"] = it

        # Evaluation and logging
        charts = evaluate(args, model, ckpt, eval_envs) | dict(episodic_return=float(np.mean(returns)))
        charts.update(env_steps=L["env_steps"], grad_updates=L["grad_updates"], learning_rate=args.learning_rate)
        charts["SPS"] = (L["env_steps"] - steps_at_start) / (time.time() - start)
        stats.update(alpha=args.rl_coef if args.algo == "odt_td3" else 0.0, temperature=L["log_temperature"].exp().item())
        for prefix, values in (("charts", charts), ("losses", stats)):
            for k, v in values.items():
                writer.add_scalar(f"{prefix}/{k}", v, it)
        history.append(dict(iteration=it, **charts, **stats))
        pbar.set_postfix(score=f"{charts['normalized_score']:.1f}", sup=f"{stats['sup_loss']:.3f}")

        budget_spent = args.total_env_steps and L["env_steps"] >= args.total_env_steps
        done = it == args.num_iterations or budget_spent or (args.max_seconds and time.time() - t_launch >= args.max_seconds)
        if args.save_every and (done or it % args.save_every == 0):
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            finetune = {k: L[k].state_dict() for k in STATEFUL} | {k: L[k] for k in COUNTERS} | dict(run_name=run_name)
            finetune |= dict(torch_rng=torch.get_rng_state(), cuda_rng=cuda_rng)
            run_state = model_checkpoint(L, ckpt, charts["normalized_score"]) | dict(args=asdict(args), finetune=finetune)
            save_atomic(state_path, run_state)
        pbar.update()
        if done:
            break
    pbar.total = pbar.n  # a budget may stop the run before --num-iterations
    pbar.close()
    writer.close()
    if args.save_model and history:
        path = Path(args.runs_dir) / run_name / f"{args.exp_name}.pt"
        save_atomic(path, model_checkpoint(L, ckpt, history[-1]["normalized_score"]))
    return history


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
