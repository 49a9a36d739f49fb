"""Q-guided GRPO-DT: online finetuning of a Decision Transformer with pure RL gradients, without state resets.

Luo & Zhu, "Online Finetuning Decision Transformers with Pure RL Gradients", Sec. 3.3.1 and App. B.1: Algorithm 1 with
line 6 replaced. G actions drawn from the DT at (s_h, g_h) are scored by a TD3 critic (ODT+TD3, Yan et al. 2024, pretrained
on the best offline trajectories), R(a_i) = min(Q1, Q2)(s_h, a_i), for the Eq. 2 group advantages of Eq. 3 (a per-action
ratio). Envs are never set to a state.

    python grpo_dt_qguided.py --env-id Hopper-v4 --dataset medium --num-iterations 200
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
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
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
    scale: Literal["paper", "cpu"] = "paper"  # size of the DT pretrained if the checkpoint is missing (cpu: 128x2)
    num_iterations: int = 200  # outer iterations of Algorithm 1; 0 only evaluates the checkpoint
    total_env_steps: int = 0  # stop after the iteration where training env steps reach this (0: no budget)
    max_seconds: float = 0  # stop after the iteration where the seconds since launch reach this (0: no budget)
    # ---- shared: finetune-args (identical in every finetuning DT script; tests/test_shared_blocks.py) ----
    checkpoint: Optional[str] = None  # pretrained DT; default checkpoints/{env}__{dataset}__s{seed}.pt, pretrained if missing
    pretrain_extra_args: str = ""  # extra pretrain_dt.py flags for that automatic pretraining, e.g. "--num-updates 2000"
    eval_episodes: int = 10  # deterministic tanh(mean) evaluation episodes, at iteration 0 and after every iteration
    eval_rtg: Optional[float] = None  # target return that conditions evaluation (raw reward units); default the checkpoint's
    eval_context_len: Optional[int] = None  # DT context of evaluation; default the context the script acts with
    # ---- end shared: finetune-args ----
    max_episode_steps: Optional[int] = None  # override the env's time limit (tests and quick runs)
    save_every: int = 5  # write the run state every this many iterations and at the end (0: never)
    save_model: bool = False  # at the end, write the DT as a checkpoint to {runs_dir}/{run_name}/{exp_name}.pt
    resume: Optional[str] = None  # continue a run state; only --num-iterations, --total-env-steps, --max-seconds may change

    # Algorithm 1, App. B.1 and Table 6 (None: the env's Table 6 value)
    full_trajs_per_iter: Optional[int] = None  # full trajectories per iteration; default 1 (5 on Adroit)
    trajs_per_iter: int = 16  # trajectories drawn per iteration, in proportion to length
    reset_points: int = 4  # K: points (s_h, g_h) per drawn trajectory, by action variance (scored, not reset to)
    group_size: int = 8  # G: candidate actions sampled and scored by the critic at each point
    n_batch: Optional[int] = None  # policy minibatch; default Table 6 (256 MuJoCo/AntMaze, 512 Adroit)
    c_online: Optional[int] = None  # DT context of rollouts, updates and evaluation; default Table 6's
    g_online: Optional[float] = None  # RTG conditioning the training rollouts; default Table 6 (e.g. 7200 Hopper)
    clip_coef: Optional[float] = None  # epsilon of the clipped ratio; default Table 6
    delta_r: Optional[float] = None  # Table 6's Delta_r (raw return units); filters the Q scores only with --delta-r-q None
    delta_r_q: Optional[float] = 0.0  # drop candidates within this many group stds of its mean; None: --delta-r
    learning_rate: float = 1e-5  # LAMB learning rate of the DT (App. B.1, Q-guided variant)
    kappa_initial: float = 1e-2  # initial entropy dual variable (App. B.1, Q-guided variant)
    kl_coef: float = 1e-3  # beta, weight of KL(pi || pi_ref) (Table 5)
    updates_per_iter: int = 8  # policy updates per iteration (each draws n_batch from the sample buffer)

    # TD3 critic (ODT+TD3, Yan et al. 2024; None: its value for the env family)
    critic_updates: Optional[int] = None  # critic updates per iteration; default 600 MuJoCo, 300 otherwise
    critic_pretrain_updates: Optional[int] = None  # offline critic updates (10k MuJoCo, 40k Adroit, 200k AntMaze)
    replay_size: Optional[int] = None  # critic replay size in trajectories (1000 MuJoCo, 5000 Adroit, 2000 AntMaze)
    critic_warmup_updates: int = 3000  # critic updates, pretraining included, before candidates are scored
    critic_batch_size: int = 256  # transitions per critic update
    critic_lr: Optional[float] = None  # AdamW learning rate of the critic; default 1e-3 MuJoCo, 2e-4 otherwise
    gamma: Optional[float] = None  # critic discount; default 0.99 (0.998 AntMaze)


# ---------------------------------------------------------------- envs and presets
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


TABLE6 = {  # per env key (HalfCheetah is not in it: ODT's RTG 12000)
    "hopper": dict(n_batch=256, c_online=1, g_online=7200, clip_coef=0.2, delta_r=2.0),
    "walker2d": dict(n_batch=256, c_online=1, g_online=10000, clip_coef=0.3, delta_r=2.0),
    "ant": dict(n_batch=256, c_online=1, g_online=12000, clip_coef=0.3, delta_r=2.0),
    "halfcheetah": dict(n_batch=256, c_online=1, g_online=12000, clip_coef=0.3, delta_r=2.0),
    "door": dict(n_batch=512, c_online=1, g_online=3000, clip_coef=0.3, delta_r=0.4),
    "pen": dict(n_batch=512, c_online=1, g_online=6000, clip_coef=0.3, delta_r=0.0),
    "hammer": dict(n_batch=512, c_online=5, g_online=4000, clip_coef=0.3, delta_r=0.8),
    "antmaze": dict(n_batch=256, c_online=1, g_online=2, clip_coef=0.2, delta_r=0.0),
}
TABLE6_BY_DATASET = {("door", "cloned"): dict(delta_r=0.5), ("hammer", "cloned"): dict(delta_r=0.0)}
TABLE6_BY_DATASET[("antmaze", "diverse")] = dict(c_online=5)
FAMILY_FIELDS = ("full_trajs_per_iter", "critic_updates", "critic_lr", "gamma", "replay_size", "critic_pretrain_updates")
FAMILY = {  # ODT+TD3's values per env family
    "mujoco": (1, 600, 1e-3, 0.99, 1000, 10_000),
    "adroit": (5, 300, 2e-4, 0.99, 5000, 40_000),
    "antmaze": (1, 300, 2e-4, 0.998, 2000, 200_000),
}
# ODT+TD3's critic rewards (r - shift) * scale per env key: Adroit scaled down, AntMaze -1 per step
REWARD = {"door": (1e-2, 0.0), "pen": (1e-2, 0.0), "hammer": (1e-3, 0.0), "antmaze": (1.0, 1.0)}
FULL_BUFFER, SAMPLE_BUFFER = 32, 2048  # App. B.1: FIFO capacities of online trajectories and of scored samples
WEIGHT_DECAY, MAX_GRAD_NORM, KAPPA_LR, REF_UPDATE_EVERY = 1e-4, 0.5, 1e-4, 4  # Table 5; ODT's kappa lr; pi_ref refresh
TAU, POLICY_NOISE, NOISE_CLIP, CRITIC_HIDDEN = 0.005, 0.2, 0.5, 256  # TD3 as ODT+TD3 runs it
EPS_ACTION = 1e-6  # actions are kept inside (-1, 1) so atanh in log_prob stays finite
BUDGET = ("num_iterations", "total_env_steps", "max_seconds")  # the flags --resume may change


def apply_presets(args: Args) -> Args:
    family, key = env_family(args.env_id)
    table = TABLE6[key] | dict(zip(FAMILY_FIELDS, FAMILY[family]))
    for (k, word), override in TABLE6_BY_DATASET.items():
        table |= override if k == key and word in args.dataset else {}
    args = replace(args, **{k: v for k, v in table.items() if getattr(args, k) is None})
    return replace(args, eval_context_len=args.eval_context_len or args.c_online)


def check(args: Args):
    sizes = ("eval_episodes", "full_trajs_per_iter", "trajs_per_iter", "reset_points", "n_batch", "c_online", "replay_size")
    sizes += ("eval_context_len", "critic_batch_size", "max_episode_steps", "learning_rate", "kappa_initial", "critic_lr")
    counts = ("num_iterations", "total_env_steps", "max_seconds", "save_every", "updates_per_iter", "critic_updates")
    check_args(args, positive=sizes, nonnegative=counts + ("critic_pretrain_updates",), unit=("gamma",))
    if args.group_size < 2:
        raise UserError(f"--group-size must be >= 2 (a group of one has no advantage), got {args.group_size}")


def offline_trajectories(ckpt: dict, meta: dict) -> list[dict]:
    """The checkpoint's dataset as rollouts: T+1 states and hindsight RTG tokens (as pretraining saw them), T+1 actions."""
    family, raw = env_family(ckpt["env_id"])[0], []
    if path := ckpt["pretrain_args"]["dataset_path"]:
        import h5py

        with h5py.File(path, "r") as f:
            d = {k: v[()] for k, v in f.items() if isinstance(v, h5py.Dataset)}
        nxt = d.get("next_observations", d["observations"])  # without next_observations the last obs is repeated
        for t in np.split(np.arange(len(d["rewards"])), np.flatnonzero(d["terminals"] | d["timeouts"]) + 1):
            if len(t):  # the split after a final terminal leaves an empty tail
                obs = np.concatenate([d["observations"][t], nxt[t[-1:]]])
                raw.append((obs, d["actions"][t], d["rewards"][t], bool(d["terminals"][t[-1]])))
    else:
        import minari

        if ckpt["dataset_id"] not in minari.list_local_datasets():
            raise UserError(f"the checkpoint's dataset {ckpt['dataset_id']!r} is not under MINARI_DATASETS_PATH")
        for ep in minari.load_dataset(ckpt["dataset_id"]).iterate_episodes():
            obs = flatten_antmaze_obs(ep.observations) if family == "antmaze" else ep.observations
            raw.append((obs, ep.actions, ep.rewards, bool(ep.terminations[-1])))
    trajs = []
    for obs, actions, rewards, terminated in raw:
        if family != "antmaze" or len(rewards) > 1:  # as pretraining: AntMaze's 1-step trajectories dropped
            rtg = np.append(np.cumsum(np.asarray(rewards, np.float64)[::-1])[::-1], 0.0) * meta["rtg_scale"]
            states = (np.asarray(obs, np.float32) - meta["state_mean"]) / meta["state_std"]
            actions = np.concatenate([actions, np.zeros((1, actions.shape[1]))]).astype(np.float32)
            trajs.append(dict(states=states, rtg=rtg.astype(np.float32), actions=actions, terminated=terminated))
            trajs[-1]["rewards"] = np.asarray(rewards, np.float32)
    return trajs


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
    """TD3's twin Q of ODT+TD3: (s, a) -> 256 -> 256 -> 1 with ReLU; a non-affine LayerNorm outside MuJoCo."""

    def __init__(self, state_dim, act_dim, layer_norm: bool):
        super().__init__()
        h, norm = CRITIC_HIDDEN, nn.LayerNorm if layer_norm else nn.Identity  # Identity ignores its arguments

        def layers(n_in):
            return [nn.Linear(n_in, h), norm(h, elementwise_affine=False), nn.ReLU()]

        self.q1, self.q2 = (nn.Sequential(*layers(state_dim + act_dim), *layers(h), nn.Linear(h, 1)) for _ in range(2))

    def forward(self, states, actions):
        x = torch.cat([states, actions], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


# ---------------------------------------------------------------- algorithm pieces
def policy_head(model, ctx):
    mean, log_std = model(*ctx)
    return mean[:, -1], log_std[:, -1]


@torch.no_grad()
def run_episodes(model, envs, seeds, meta, target_rtg, c, deterministic):
    """One episode per env, in lockstep; only `env.reset(seed)` starts one. T steps + the final state, zero action."""
    n, rtg_scale, device = len(envs), meta["rtg_scale"], next(model.parameters()).device
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])
    A, keys = envs[0].action_space.shape[0], ("states", "rtg", "actions", "rewards", "var")
    rtg, states, actions = (torch.zeros(n, c, d, device=device) for d in (1, obs.shape[1], A))
    rtg_now, mask = np.full(n, target_rtg * rtg_scale, dtype=np.float32), torch.zeros(n, c, dtype=torch.bool, device=device)
    rec, alive = [{k: [] for k in keys} for _ in range(n)], np.ones(n, dtype=bool)
    while alive.any():
        s_norm = (obs.astype(np.float32) - meta["state_mean"]) / meta["state_std"]
        # Shift the context one step left and write the newest state and RTG in the last slot.
        states, actions, rtg, mask = (x.roll(-1, dims=1) for x in (states, actions, rtg, mask))
        states[:, -1], rtg[:, -1, 0] = torch.as_tensor(s_norm, device=device), torch.as_tensor(rtg_now, device=device)
        actions[:, -1], mask[:, -1] = 0.0, True
        mean, log_std = policy_head(model, (rtg, states, actions, mask))
        act = torch.tanh(mean) if deterministic else squashed_gaussian(mean, log_std).sample()
        actions[:, -1] = act = act.clamp(-1 + EPS_ACTION, 1 - EPS_ACTION)
        if not torch.isfinite(act).all():
            raise FloatingPointError("action")  # main stops the run with one line
        act_np, var = act.cpu().numpy(), (2 * log_std).exp().mean(-1).cpu().numpy()
        for i in np.flatnonzero(alive):  # finished envs are not stepped again
            o, r, term, trunc, _ = envs[i].step(act_np[i])
            for k, v in zip(keys, (s_norm[i], rtg_now[i], act_np[i], r, var[i])):
                rec[i][k].append(v)
            obs[i], alive[i], rec[i]["terminated"] = o, not (term or trunc), term
            rtg_now[i] -= np.float32(r * rtg_scale)
    final = (obs.astype(np.float32) - meta["state_mean"]) / meta["state_std"]
    for i, r in enumerate(rec):
        r.update(states=np.stack(r["states"] + [final[i]]), rtg=np.array(r["rtg"] + [rtg_now[i]]), var=np.array(r["var"]))
        r.update(actions=np.stack(r["actions"] + [np.zeros(A, np.float32)]), terminated=bool(r["terminated"]))
        r.update(rewards=np.array(r["rewards"], np.float32), **{"return": float(np.sum(r["rewards"]))})  # summed in float64
    return rec


def evaluate(model, envs, args: Args, meta, counters) -> dict:
    rtg, seeds = meta["eval_rtg"] if args.eval_rtg is None else args.eval_rtg, eval_seeds(args.seed, len(envs))
    trajs = run_episodes(model, envs, seeds, meta, target_rtg=rtg, c=args.eval_context_len, deterministic=True)
    rets, lo, hi = np.array([t["return"] for t in trajs]), meta["ref_min_score"], meta["ref_max_score"]
    charts = dict(normalized_score=float(np.mean(100.0 * (rets - lo) / (hi - lo))), eval_return=float(rets.mean()))
    charts.update(env_steps=counters["env_steps"], grad_updates=counters["critic_updates"] + counters["policy_updates"])
    return {f"charts/{k}": v for k, v in charts.items()}


def contexts(traj, hs, c, starts=0):
    """The DT inputs ending at each step h, as the rollout fed them; `starts` separates back-to-back trajectories."""
    offs = hs[:, None] - (c - 1) + np.arange(c)[None]
    mask = offs >= np.reshape(starts, (-1, 1))
    idx = np.where(mask, offs, 0)
    rtg = np.where(mask, traj["rtg"][idx], 0.0)[..., None]
    states = np.where(mask[..., None], traj["states"][idx], 0.0)
    actions = np.where((mask & (offs < hs[:, None]))[..., None], traj["actions"][idx], 0.0)
    return rtg.astype(np.float32), states.astype(np.float32), actions.astype(np.float32), mask


def sample_points(trajs, n_trajectories, k, c, rng, device):
    """Algorithm 1 lines 3-5: trajectories by length, then K steps of each by softmax of the action variance."""
    lengths, ctx = np.array([len(t["rewards"]) for t in trajs]), []
    for j in rng.choice(len(trajs), size=n_trajectories, p=lengths / lengths.sum()):
        p = np.exp(trajs[j]["var"].astype(np.float64) - trajs[j]["var"].max())
        ctx.append(contexts(trajs[j], rng.choice(lengths[j], size=k, p=p / p.sum(), replace=lengths[j] < k), c))
    return tuple(torch.as_tensor(np.concatenate(x), device=device) for x in zip(*ctx))


@torch.no_grad()
def q_guided_scores(model, critic, ctx, group_size, reward_scale, action_margin=1e-6, censor_bound=None):
    """Sec. 3.3.1: G actions per context and their scores min(Q1, Q2)(s_h, a_i) in raw reward units, (N, G, ...)."""
    mean, log_std = policy_head(model, ctx)
    actions = squashed_gaussian(mean, log_std).sample((group_size,)).clamp(-1 + EPS_ACTION, 1 - EPS_ACTION)  # (G, N, A)
    log_probs = action_log_prob(mean, log_std, actions, action_margin, censor_bound)
    scores = torch.min(*critic(ctx[1][:, -1].expand(group_size, -1, -1), actions)) / reward_scale  # s_h: the newest state
    return actions.transpose(0, 1), log_probs.T, scores.T


def group_advantages(scores, delta_r, delta_r_q=None):
    """Eq. 2 per row and the kept ones: |adv| > delta_r_q group stds, or (delta_r_q None) |score - mean| > Delta_r."""
    centred = scores - scores.mean(dim=1, keepdim=True)
    adv = centred / (scores.std(dim=1, correction=0, keepdim=True) + 1e-8)
    return adv, centred.abs() > delta_r if delta_r_q is None else adv.abs() > delta_r_q


def policy_objective(model, ref_model, batch, clip_coef, action_margin=1e-6, censor_bound=None):
    """Eq. 3's clipped surrogate (per-action ratio), KL to pi_ref of the pre-tanh Gaussians, ODT's entropy estimate."""
    ctx, adv = (batch["rtg"], batch["states"], batch["ctx_actions"], batch["mask"]), batch["advantage"]
    mean, log_std = policy_head(model, ctx)
    ratio = (action_log_prob(mean, log_std, batch["action"], action_margin, censor_bound) - batch["old_log_prob"]).exp()
    policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_coef, 1 + clip_coef) * adv).mean()
    with torch.no_grad():
        ref_mean, ref_log_std = policy_head(ref_model, ctx)
    dist = squashed_gaussian(mean, log_std)
    entropy = -dist.log_prob(dist.rsample()).mean()  # before the KL, so autograd sums the gradients in this order
    kl = kl_divergence(Normal(mean, log_std.exp()), Normal(ref_mean, ref_log_std.exp())).sum(-1).mean()
    clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return dict(policy_loss=policy_loss, ratio=ratio, clipfrac=clipfrac, kl=kl, entropy=entropy)


def td_target(rewards, terminated, next_q1, next_q2, gamma):
    """Termination cuts the bootstrap, a time-limit truncation keeps it."""
    return rewards + gamma * (1.0 - terminated.float()) * torch.min(next_q1, next_q2)


def flatten_replay(trajs, reward_scale, reward_shift) -> dict:
    """The replay's T+1 rows back to back; per transition its row, its trajectory's first row, reward, termination."""
    lengths = np.array([len(t["rewards"]) for t in trajs])
    firsts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    flat = {k: np.concatenate([t[k] for t in trajs]).astype(np.float32) for k in ("states", "rtg", "actions")}
    flat |= dict(row=np.concatenate([f + np.arange(n) for f, n in zip(firsts, lengths)]), first=np.repeat(firsts, lengths))
    flat["r"] = np.concatenate([(t["rewards"] - reward_shift) * reward_scale for t in trajs]).astype(np.float32)
    flat["term"] = np.concatenate([(np.arange(n) == n - 1) & t["terminated"] for n, t in zip(lengths, trajs)])
    return flat


@torch.no_grad()
def critic_batch(flat: dict, idx, model, c: int, device) -> dict:
    """Transitions `idx`; the target action is the current DT's tanh(mean): it moves slowly, so no Polyak copy of it."""
    row = flat["row"][idx]
    batch = dict(s=flat["states"][row], a=flat["actions"][row], r=flat["r"][idx], s2=flat["states"][row + 1])
    batch = {k: torch.as_tensor(v, device=device) for k, v in {**batch, "term": flat["term"][idx]}.items()}
    ctx2 = [torch.as_tensor(x, device=device) for x in contexts(flat, row + 1, c, starts=flat["first"][idx])]
    batch["a2"] = torch.tanh(policy_head(model, ctx2)[0])
    return batch


def train_critic(run, args: Args, meta: dict, n_updates: int, desc: Optional[str] = None) -> dict:
    """TD3 on uniform minibatches of the replay: target policy smoothing, twin critics, Polyak targets."""
    flat, stats = flatten_replay(run.replay, meta["reward_scale"], meta["reward_shift"]), {}
    for _ in tqdm(range(n_updates), desc=desc, disable=desc is None, leave=False, mininterval=2.0):
        idx = run.rng.integers(len(flat["r"]), size=args.critic_batch_size)
        batch = critic_batch(flat, idx, run.model, args.c_online, run.device)
        with torch.no_grad():
            noise = (torch.randn_like(batch["a2"]) * POLICY_NOISE).clamp(-NOISE_CLIP, NOISE_CLIP)
            next_q1, next_q2 = run.critic_target(batch["s2"], (batch["a2"] + noise).clamp(-1, 1))
            target = td_target(batch["r"], batch["term"], next_q1, next_q2, gamma=args.gamma)
        q1, q2 = run.critic(batch["s"], batch["a"])
        loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        if not torch.isfinite(loss):
            raise FloatingPointError("critic loss")  # main stops the run with one line
        run.critic_opt.zero_grad()
        loss.backward()
        run.critic_opt.step()
        for p, tp in zip(run.critic.parameters(), run.critic_target.parameters()):
            tp.lerp_(p.detach(), TAU)  # Polyak averaging
        for k, v in dict(critic_loss=loss, q_values=q1.mean()).items():
            stats.setdefault(f"losses/{k}", []).append(v.item())
    run.counters["critic_updates"] += n_updates
    return stats


def train_policy(run, args: Args, meta: dict) -> dict:
    """Line 9: Eq. 3 - beta KL + kappa H; kappa is a dual variable pushing the entropy towards -|A| (ODT)."""
    stats, n = {}, len(run.samples.get("action", []))
    for _ in range(args.updates_per_iter if n else 0):
        idx = torch.as_tensor(run.rng.choice(n, size=args.n_batch, replace=args.n_batch > n))
        batch = {k: v[idx] for k, v in run.samples.items()}
        terms = policy_objective(run.model, run.ref_model, batch, args.clip_coef, **meta["likelihood"])
        kappa = run.log_kappa.exp()
        loss = terms["policy_loss"] + args.kl_coef * terms["kl"] - kappa.detach() * terms["entropy"]
        kappa_loss = kappa * (terms["entropy"] - meta["target_entropy"]).detach()  # the dual step on log(kappa)
        run.policy_opt.zero_grad()
        run.kappa_opt.zero_grad()
        (loss + kappa_loss).backward()  # the two losses share no parameters
        nn.utils.clip_grad_norm_(run.model.parameters(), MAX_GRAD_NORM)
        run.policy_opt.step()
        run.kappa_opt.step()
        run.counters["policy_updates"] += 1
        if run.counters["policy_updates"] % REF_UPDATE_EVERY == 0:
            run.ref_model.load_state_dict(run.model.state_dict())
        terms.update(ratio_mean=terms.pop("ratio").mean(), kappa=kappa)
        for k, v in terms.items():
            stats.setdefault(f"losses/{k}", []).append(v.item())
    return stats


# ---------------------------------------------------------------- run state
class Run:
    """What finetuning changes and --resume restores (with the torch and numpy RNGs)."""

    def __init__(self, model, args: Args, device):
        self.model, self.ref_model, self.device = model, copy.deepcopy(model).requires_grad_(False), device
        dims = model.embed_state.in_features, model.embed_action.in_features
        self.critic = TwinCritic(*dims, layer_norm=env_family(args.env_id)[0] != "mujoco").to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_kappa = torch.tensor(float(np.log(args.kappa_initial)), device=device, requires_grad=True)
        self.policy_opt = Lamb(model.parameters(), lr=args.learning_rate, weight_decay=WEIGHT_DECAY)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=args.critic_lr)
        self.kappa_opt = torch.optim.Adam([self.log_kappa], lr=KAPPA_LR)
        self.trajs, self.replay, self.replay_next, self.samples = [], [], 0, {}
        self.counters = dict(iteration=0, env_steps=0, critic_updates=0, policy_updates=0)
        self.rng = np.random.default_rng(args.seed)

    def state(self) -> dict:
        state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in vars(self).items() if k != "device"}
        return state | dict(torch_rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all())

    @torch.no_grad()
    def restore(self, state: dict):
        for k, v in list(vars(self).items()):
            if hasattr(v, "load_state_dict"):
                v.load_state_dict(state[k])
            elif k not in ("device", "log_kappa"):
                setattr(self, k, state[k])
        self.samples = {k: v.to(self.device) for k, v in self.samples.items()}
        self.log_kappa.copy_(state["log_kappa"])
        torch.set_rng_state(state["torch_rng"])
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def finetuned_checkpoint(ckpt: dict, model, score: float) -> dict:
    """The finetuned DT with the pretrained checkpoint's metadata: a checkpoint load_model reads."""
    pretrained = {k: v for k, v in ckpt.items() if k not in ("args", "finetune")}
    return pretrained | dict(state_dict={k: v.cpu() for k, v in model.state_dict().items()}, eval_normalized_score=score)


# ---------------------------------------------------------------- main
def main(args: Args) -> float:
    start_time = time.time()  # --max-seconds counts from here, loading included
    args, state = resume_args(args, BUDGET)
    args = apply_presets(args)
    check(args)
    device = seed_everything(args)

    # Start: the pretrained DT (or the run to resume) with dropout off; pi_ref, fresh critics, kappa, empty buffers
    model, ckpt = load_model(args.resume or ensure_checkpoint(args), device)
    run_name = state["finetune"]["run_name"] if state else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    kw = dict(env_id=args.env_id, max_episode_steps=args.max_episode_steps)
    envs = [make_env(**kw) for _ in range(args.full_trajs_per_iter)]
    eval_envs = [make_env(**kw, render_mode="rgb_array" if args.capture_video else None) for _ in range(args.eval_episodes)]
    if args.capture_video:  # the first evaluation episode of every evaluation
        eval_envs[0] = gym.wrappers.RecordVideo(eval_envs[0], f"videos/{run_name}")
    need = tuple(ckpt["model_config"][k] for k in ("state_dim", "act_dim"))
    if need != (dims := envs[0].observation_space.shape + envs[0].action_space.shape):
        raise UserError(f"the checkpoint's {ckpt['env_id']} has dims {need}, {args.env_id} has {dims}")
    meta = ckpt | dict(state_mean=ckpt["state_mean"].numpy(), state_std=ckpt["state_std"].numpy())
    meta |= dict(zip(("reward_scale", "reward_shift"), REWARD.get(env_family(args.env_id)[1], (1.0, 0.0))))
    meta["likelihood"] = dict(action_margin=ckpt["action_margin"], censor_bound=ckpt["censor_bound"])
    run = Run(model.eval(), args, device)
    if state:
        run.restore(state["finetune"])
    counters = run.counters
    writer = make_writer(args, run_name, purge_step=counters["iteration"] + 1 if state else None)
    state_path = Path(args.runs_dir) / run_name / "state.pt"
    if args.save_every:
        print(f"run state: {state_path}", flush=True)

    pbar = tqdm(total=args.num_iterations, initial=counters["iteration"], desc="grpo-dt-qguided", mininterval=2.0)
    try:
        score = ckpt["eval_normalized_score"]
        if not state:  # iteration 0: the loaded checkpoint, before any update
            stats = evaluate(model, eval_envs, args, meta, counters)
            for k, v in stats.items():
                writer.add_scalar(k, v, 0)
            score = stats["charts/normalized_score"]
        if not state and args.num_iterations > 0:
            # ALGO LOGIC: the critic's replay seeded with the best offline trajectories, the critic pretrained on it
            run.replay = sorted(offline_trajectories(ckpt, meta), key=lambda t: t["rewards"].sum())[-args.replay_size :]
            run.replay_next = len(run.replay) % args.replay_size
            stats = train_critic(run, args, meta, args.critic_pretrain_updates, desc="critic pretraining")
            for k, v in stats.items():  # logged in chunks of 100 updates
                for i in range(0, len(v), 100):
                    writer.add_scalar(k.replace("losses/", "pretrain/"), np.mean(v[i : i + 100]), i)
        t_loop, start_steps, stop = time.time(), counters["env_steps"], False
        while counters["iteration"] < args.num_iterations and not stop:
            iteration = counters["iteration"] = counters["iteration"] + 1
            # ALGO LOGIC line 2: full trajectories conditioned on g_online, sampled actions, no relabeling; FIFO
            seeds = train_seeds(run.rng, len(envs))
            trajs = run_episodes(model, envs, seeds, meta, target_rtg=args.g_online, c=args.c_online, deterministic=False)
            run.trajs = (run.trajs + trajs)[-FULL_BUFFER:]
            for traj in trajs:  # into the critic's replay at replay_next: the worst offline ones go first, then the oldest
                run.replay[run.replay_next : run.replay_next + 1] = [traj]
                run.replay_next = (run.replay_next + 1) % args.replay_size
            counters["env_steps"] += sum(len(t["rewards"]) for t in trajs)
            stats = {"charts/episodic_return": np.mean([t["return"] for t in trajs])}

            # ALGO LOGIC: Q_phi by TD3 on the replay (twin critics, target nets, truncation bootstraps)
            stats |= train_critic(run, args, meta, args.critic_updates)

            # ALGO LOGIC lines 3-8: G critic-scored actions at K actively sampled points of each drawn trajectory;
            # those the Delta_r filter keeps enter the FIFO sample buffer with context, old log-prob and advantage
            if counters["critic_updates"] >= args.critic_warmup_updates:
                ctx = sample_points(run.trajs, args.trajs_per_iter, args.reset_points, args.c_online, run.rng, device)
                actions, old_log_probs, scores = q_guided_scores(
                    model, run.critic, ctx, args.group_size, meta["reward_scale"], **meta["likelihood"]
                )
                adv, keep = group_advantages(scores, args.delta_r, args.delta_r_q)
                rows, cols = keep.nonzero(as_tuple=True)
                new = dict(rtg=ctx[0][rows], states=ctx[1][rows], ctx_actions=ctx[2][rows], mask=ctx[3][rows])
                new.update(action=actions[rows, cols], old_log_prob=old_log_probs[rows, cols], advantage=adv[rows, cols])
                run.samples = {k: torch.cat([run.samples.get(k, v[:0]), v])[-SAMPLE_BUFFER:] for k, v in new.items()}
                stats["losses/group_score_std"] = scores.std(dim=1, correction=0).mean().item()
                stats["losses/kept_fraction"] = keep.float().mean().item()

            # ALGO LOGIC line 9: Eq. 3 with per-action ratios, - beta KL(pi || pi_ref), + kappa H
            stats |= train_policy(run, args, meta)

            # Evaluate, log, save, budgets
            stats |= evaluate(model, eval_envs, args, meta, counters)
            stats["charts/SPS"] = int((counters["env_steps"] - start_steps) / max(time.time() - t_loop, 1e-9))
            for k, v in stats.items():
                writer.add_scalar(k, np.mean(v), iteration)
            score = stats["charts/normalized_score"]
            pbar.update()
            pbar.set_postfix(score=f"{score:.1f}", steps=counters["env_steps"])
            stop = bool(args.total_env_steps and counters["env_steps"] >= args.total_env_steps)
            stop |= bool(args.max_seconds and time.time() - start_time >= args.max_seconds)
            if args.save_every and (iteration % args.save_every == 0 or iteration == args.num_iterations or stop):
                finetune = run.state() | dict(run_name=run_name)
                save_atomic(state_path, finetuned_checkpoint(ckpt, model, score) | dict(args=asdict(args), finetune=finetune))
        pbar.total = pbar.n  # a budget may end the run early
    except FloatingPointError as e:
        kept = f"last good state kept at {state_path}" if state_path.is_file() else "no state saved yet"
        raise UserError(f"non-finite {e} at iteration {counters['iteration']}; stopped, {kept}") from None
    finally:
        pbar.close()
    if args.save_model:
        save_atomic(Path(args.runs_dir) / run_name / f"{args.exp_name}.pt", finetuned_checkpoint(ckpt, model, score))
    writer.close()
    return score


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
