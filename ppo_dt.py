"""PPO-DT: online finetuning of a pretrained Decision Transformer with PPO and GAE, without hindsight relabeling.

Paper: "Online Finetuning Decision Transformers with Pure RL Gradients" (Luo & Zhu), Sec. 3.3.2, App. B.2, Algorithm 2.
Example (pretrains the checkpoint first if it is missing): python ppo_dt.py --env-id Hopper-v4 --dataset medium
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
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
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
    # ---- shared: finetune-args (identical in every finetuning DT script; tests/test_shared_blocks.py) ----
    checkpoint: Optional[str] = None  # pretrained DT; default checkpoints/{env}__{dataset}__s{seed}.pt, pretrained if missing
    pretrain_extra_args: str = ""  # extra pretrain_dt.py flags for that automatic pretraining, e.g. "--num-updates 2000"
    eval_episodes: int = 10  # deterministic tanh(mean) evaluation episodes, at iteration 0 and after every iteration
    eval_rtg: Optional[float] = None  # target return that conditions evaluation (raw reward units); default the checkpoint's
    eval_context_len: Optional[int] = None  # DT context of evaluation; default the context the script acts with
    # ---- end shared: finetune-args ----
    scale: Literal["paper", "cpu"] = "paper"  # size of the DT pretrained if the checkpoint is missing (cpu: 128x2)
    num_iterations: int = 100  # outer iterations of Algorithm 2 (0: only evaluate the checkpoint)
    total_env_steps: int = 0  # stop after the iteration where training env steps reach this (0: no budget)
    max_seconds: float = 0  # stop after the iteration where the seconds since launch reach this (0: no budget)
    save_every: int = 5  # write the run state every this many iterations and at the end (0: never)
    save_path: Optional[str] = None  # where the run state goes; default `{runs_dir}/{run_name}/state.pt`
    save_model: bool = False  # at the end, write the DT as a checkpoint to {runs_dir}/{run_name}/{exp_name}.pt
    resume: Optional[str] = None  # continue a run state; only --num-iterations, --total-env-steps, --max-seconds may change
    max_episode_steps: Optional[int] = None  # override the env's time limit (bootstrapped)
    # Table 7 (None: the --dataset row, see `apply_presets`)
    n_batch: Optional[int] = None  # sub-trajectories per gradient update (256 MuJoCo/AntMaze, 512 Adroit)
    c_online: Optional[int] = None  # context length at rollout and training (1; 5 for Hammer and AntMaze umaze-diverse)
    c_train: Optional[int] = None  # sub-trajectory length CL_train in steps; default c_online
    g_online: Optional[float] = None  # initial RTG of training rollouts, raw reward units (7200 Hopper, 3000 Door, ...)
    k_ppo: Optional[int] = None  # trajectories rolled out per iteration (8; 16 Door/Hammer)
    learning_rate: Optional[float] = None  # LAMB learning rate of the DT (5e-5 MuJoCo/AntMaze, 3e-5 Adroit)
    lr_value: Optional[float] = None  # AdamW learning rate of the value MLP (1e-3 MuJoCo/AntMaze, 2e-4 Adroit)
    kappa_initial: Optional[float] = None  # initial entropy dual variable
    updates_per_iter: int = 8  # gradient updates per iteration, each on n_batch sub-trajectories (Sec. 4.2: "8 x 256")
    clip_coef: float = 0.2  # PPO ratio clip epsilon (Table 7)
    gamma: float = 0.99  # GAE discount (Table 7)
    gae_lambda: float = 0.95  # GAE lambda (Table 7)
    kl_coef: float = 1e-3  # coefficient beta of KL(pi || pi_ref) (Table 5)
    ref_update_every: int = 4  # copy the policy into the reference policy every this many updates (Sec. 3.2)
    buffer_factor: int = 4  # the FIFO trajectory buffer holds buffer_factor x K_PPO trajectories (App. B.1)
    relabel: bool = False  # hindsight-relabel stored RTGs (ODT; Sec. 3.1, Fig. 1)
    max_grad_norm: float = 0.5  # global gradient-norm clip for the policy and the value network (Table 5)
    weight_decay: float = 1e-4  # LAMB weight decay of the policy (Table 5)
    kappa_lr: float = 1e-4  # Adam learning rate of log(kappa) (ODT's temperature learning rate)
    target_entropy: Optional[float] = None  # entropy lower bound rho; default -dim(A) (Table 5)
    value_hidden: Optional[int] = None  # value MLP width; default 256 MuJoCo, 512 otherwise (Table 5)
    value_scale: Optional[float] = None  # V = this x MLP(s); default eval_rtg/T x min(T, 1/(1-gamma)); 1: plain


TABLE7_FIELDS = ("n_batch", "c_online", "g_online", "k_ppo", "learning_rate", "lr_value", "kappa_initial")
TABLE7 = {
    ("hopper", "medium"): (256, 1, 7200, 8, 5e-5, 1e-3, 0.02),
    ("hopper", "random"): (256, 1, 7200, 8, 5e-5, 1e-3, 0.04),
    ("walker2d", "medium"): (256, 1, 10000, 8, 5e-5, 1e-3, 0.02),
    ("walker2d", "random"): (256, 1, 10000, 8, 5e-5, 1e-3, 0.20),
    ("ant", "medium"): (256, 1, 12000, 8, 5e-5, 1e-3, 0.02),
    ("ant", "random"): (256, 1, 12000, 8, 5e-5, 1e-3, 0.02),
    ("halfcheetah", "medium"): (256, 1, 12000, 8, 5e-5, 1e-3, 0.02),  # not in Table 7: 2x ODT's eval RTG 6000
    ("door", "human"): (512, 1, 3000, 16, 3e-5, 2e-4, 0.002),
    ("pen", "human"): (512, 1, 6000, 8, 3e-5, 2e-4, 0.04),
    ("hammer", "human"): (512, 5, 4000, 16, 3e-5, 2e-4, 0.005),
    ("antmaze", "umaze"): (256, 1, 2, 8, 5e-5, 1e-3, 0.02),
    ("antmaze", "umaze-diverse"): (256, 5, 2, 8, 5e-5, 1e-3, 0.02),
}


def apply_presets(args: Args) -> Args:
    """Fields left at None from Table 7's row of the dataset's kind, else of its family's medium/human/umaze row."""
    family, key = env_family(args.env_id)
    kind = args.dataset.rstrip("/").rsplit("/", 1)[-1].split("-v")[0]  # local/hopper/medium-v0 -> medium
    row = TABLE7.get((key, kind)) or TABLE7[key, {"mujoco": "medium", "adroit": "human", "antmaze": "umaze"}[family]]
    args = replace(args, **{k: v for k, v in zip(TABLE7_FIELDS, row) if getattr(args, k) is None})
    return replace(args, c_train=args.c_train or args.c_online, eval_context_len=args.eval_context_len or args.c_online)


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


class ValueNet(nn.Module):
    """V(s) = scale x MLP(s), so the MLP works at O(1); 2 hidden SiLU layers (Table 5), LayerNorm off MuJoCo (App. B.1)."""

    def __init__(self, state_dim: int, hidden: int, layer_norm: bool, scale: float):
        super().__init__()
        norm = partial(nn.LayerNorm, hidden) if layer_norm else nn.Identity
        self.net = nn.Sequential(
            nn.Linear(state_dim, hidden), norm(), nn.SiLU(), nn.Linear(hidden, hidden), norm(), nn.SiLU(), nn.Linear(hidden, 1)
        )
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, states):
        return self.scale * self.net(states).squeeze(-1)


@torch.no_grad()
def rollout(model, envs, seeds, target_rtg, ckpt, context_len, deterministic):
    """One episode per env in lockstep; each keeps the tokens the policy saw, log-probs, rewards and how it ended."""
    device, rtg_scale, n = next(model.parameters()).device, ckpt["rtg_scale"], len(envs)
    mu, sd = (ckpt[k].cpu().numpy() for k in ("state_mean", "state_std"))
    obs = [(np.asarray(env.reset(seed=int(s))[0], np.float32) - mu) / sd for env, s in zip(envs, seeds)]  # normalised
    states, actions = (torch.zeros(n, context_len, d, device=device) for d in (len(mu), envs[0].action_space.shape[0]))
    rtg, mask = torch.zeros(n, context_len, 1, device=device), torch.zeros(n, context_len, dtype=torch.bool, device=device)
    target = torch.full((n,), target_rtg * rtg_scale, device=device)
    keys = ("states", "rtg", "actions", "logp", "rewards")
    rec, alive = [{k: [] for k in keys} for _ in range(n)], np.ones(n, dtype=bool)
    while alive.any():
        live = torch.as_tensor(np.flatnonzero(alive), device=device)
        states, actions, rtg, mask = (x.roll(-1, dims=1) for x in (states, actions, rtg, mask))  # left padding
        states[live, -1] = torch.as_tensor(np.stack([obs[i] for i in live.tolist()]), device=device)
        rtg[:, -1, 0], actions[:, -1], mask[:, -1] = target, 0.0, True
        mean, log_std = (x[:, -1] for x in model(rtg[live], states[live], actions[live], mask[live]))
        # Clamped so the stored action has a finite atanh: rollout and training score it alike.
        act = torch.tanh(mean) if deterministic else squashed_gaussian(mean, log_std).sample().clamp(-1 + 1e-6, 1 - 1e-6)
        logp = action_log_prob(mean, log_std, act, ckpt["action_margin"], ckpt["censor_bound"])
        actions[live, -1] = act
        step = [x.cpu().numpy() for x in (states[live, -1], rtg[live, -1, 0], act, logp)]
        for j, i in enumerate(live.tolist()):
            o, r, term, trunc, _ = envs[i].step(step[2][j])
            for k, v in zip(keys, [x[j] for x in step] + [r]):
                rec[i][k].append(v)
            obs[i], target[i] = (np.asarray(o, np.float32) - mu) / sd, target[i] - r * rtg_scale
            if term or trunc:
                alive[i] = False
                rec[i] |= dict(terminated=bool(term), last_state=obs[i])
    return [r | {k: np.array(r[k], np.float32) for k in keys} | {"return": float(np.sum(r["rewards"]))} for r in rec]


def compute_gae(rewards, values, last_value, terminated, gamma, lam):
    """Eq. 4 for one trajectory; a time-limit truncation bootstraps from V(s_T) = last_value, a termination does not."""
    next_values = np.append(values[1:], 0.0 if terminated else last_value)
    deltas = rewards + gamma * next_values - values
    adv, acc = np.zeros(len(rewards), np.float32), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = deltas[t] + gamma * lam * acc
        adv[t] = acc
    return adv


@torch.no_grad()
def flatten_buffer(buffer, value_net, gamma, lam, relabel, rtg_scale):
    """Line 3: every buffered step with its GAE under the current value net, and the RTG tokens it was rolled out with."""
    flat = {k: np.concatenate([t[k] for t in buffer]) for k in ("states", "actions", "rtg", "logp")}
    device = value_net.scale.device
    values = value_net(torch.as_tensor(flat["states"], device=device)).cpu().numpy()
    last_values = value_net(torch.as_tensor(np.stack([t["last_state"] for t in buffer]), device=device)).cpu().numpy()
    lengths = np.array([len(t["rewards"]) for t in buffer])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    per_traj = zip(buffer, np.split(values, offsets[1:]), last_values)
    adv = np.concatenate([compute_gae(t["rewards"], v, last, t["terminated"], gamma, lam) for t, v, last in per_traj])
    if relabel:  # ODT's hindsight relabeling: the achieved suffix sums, scaled like RTG tokens (the failure mode)
        flat["rtg"] = np.concatenate([(np.cumsum(t["rewards"][::-1])[::-1] * rtg_scale).astype(np.float32) for t in buffer])
    return flat | dict(adv=adv, returns=adv + values, values=values, lengths=lengths, offsets=offsets)


def sample_batch(flat, n_batch, sub_len, context_len, rng, device):
    """Lines 4-5: trajectories drawn by length, a sub-trajectory of each; every step under its own rollout context."""
    lengths, offsets = flat["lengths"], flat["offsets"]
    idx = rng.choice(len(lengths), size=n_batch, p=lengths / lengths.sum())
    start = rng.integers(0, np.maximum(lengths[idx] - sub_len, 0) + 1)
    steps = start[:, None] + np.arange(sub_len)[None, :]
    valid = steps < lengths[idx, None]  # sub-trajectories of short episodes are cut at their end
    steps, traj = steps[valid], idx[np.nonzero(valid)[0]]
    window = steps[:, None] - context_len + 1 + np.arange(context_len)[None, :]
    src, token = offsets[traj, None] + np.maximum(window, 0), offsets[traj] + steps
    batch = dict(rtg=flat["rtg"][src][..., None], states=flat["states"][src], actions=flat["actions"][src], mask=window >= 0)
    batch |= {k: flat[k][token] for k in ("logp", "adv", "returns")}  # the rollout's log-probs, advantages, V targets
    b = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
    b["adv"] = (b["adv"] - b["adv"].mean()) / (b["adv"].std() + 1e-8)  # normalised across the batch
    return b


def ppo_policy_loss(new_logp, old_logp, adv, clip_coef):
    """Eq. 5's clipped surrogate with token-level ratios (to minimise), plus approx KL and clip fraction."""
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()
    loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_coef, 1 + clip_coef) * adv).mean()
    with torch.no_grad():  # Schulman's low-variance KL estimator, as CleanRL
        return loss, ((ratio - 1) - log_ratio).mean(), ((ratio - 1).abs() > clip_coef).float().mean()


def ppo_update(learner, b: dict, args: Args, target_entropy: float, ckpt: dict) -> dict:
    """Line 6 on one batch: Eq. 5 - beta KL(pi || pi_ref) + kappa H for the policy, kappa's dual step, Eq. 6."""
    model, value_net = learner.model, learner.value_net
    mean, log_std = (x[:, -1] for x in model(b["rtg"], b["states"], b["actions"], b["mask"]))
    dist = squashed_gaussian(mean, log_std)
    logp = action_log_prob(mean, log_std, b["actions"][:, -1], ckpt["action_margin"], ckpt["censor_bound"])
    pg_loss, approx_kl, clipfrac = ppo_policy_loss(logp, b["logp"], b["adv"], args.clip_coef)
    entropy = -dist.log_prob(dist.rsample()).mean()  # single-sample estimate: no closed form after tanh
    with torch.no_grad():
        ref_mean, ref_log_std = (x[:, -1] for x in learner.ref_model(b["rtg"], b["states"], b["actions"], b["mask"]))
    pi, ref = (Independent(Normal(m, s.exp(), validate_args=False), 1) for m, s in ((mean, log_std), (ref_mean, ref_log_std)))
    kl_ref, kappa = kl_divergence(pi, ref).mean(), learner.log_kappa.exp()
    policy_loss = pg_loss + args.kl_coef * kl_ref - kappa.detach() * entropy
    kappa_loss = kappa * (entropy.detach() - target_entropy)  # the dual step: kappa rises while entropy < target
    value_loss = F.mse_loss(value_net(b["states"][:, -1]), b["returns"])  # Eq. 6, V_target = A + V_old
    opts = (learner.policy_opt, learner.value_opt, learner.kappa_opt)
    for opt in opts:
        opt.zero_grad()
    (policy_loss + kappa_loss + value_loss).backward()  # disjoint parameters: each gets its own loss's gradient
    for net in (model, value_net):
        nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm)
    for opt in opts:
        opt.step()
    learner.grad_updates += 1
    if learner.grad_updates % args.ref_update_every == 0:  # the slowly refreshed reference policy
        learner.ref_model.load_state_dict(model.state_dict())
    stats = dict(policy_loss=pg_loss, value_loss=value_loss, approx_kl=approx_kl, clipfrac=clipfrac, entropy=entropy)
    return {k: v.item() for k, v in (stats | dict(kappa=kappa, kl_ref=kl_ref)).items()}


def evaluate(model, envs, args: Args, ckpt: dict, writer, it: int) -> float:
    """Normalized score of tanh(mean) episodes from `eval_seeds`, at --eval-rtg and --eval-context-len."""
    rtg = ckpt["eval_rtg"] if args.eval_rtg is None else args.eval_rtg
    trajs = rollout(model, envs, eval_seeds(args.seed, len(envs)), rtg, ckpt, args.eval_context_len, deterministic=True)
    rets = np.array([t["return"] for t in trajs])
    score = float(np.mean(100.0 * (rets - ckpt["ref_min_score"]) / (ckpt["ref_max_score"] - ckpt["ref_min_score"])))
    writer.add_scalar("charts/normalized_score", score, it)
    writer.add_scalar("charts/eval_return", rets.mean(), it)
    tqdm.write(f"iteration {it}: eval return {rets.mean():.1f}, normalized score {score:.1f}")
    return score


class Learner:
    """What the updates change and --resume restores; the DT's weights are the run state's checkpoint part."""

    NETS = ("value_net", "ref_model", "policy_opt", "value_opt", "kappa_opt")
    KEPT = ("buffer", "rng", "iteration", "env_steps", "grad_updates")

    def __init__(self, args: Args, model, value_net, device):
        self.model, self.ref_model, self.value_net = model, copy.deepcopy(model).requires_grad_(False), value_net
        self.log_kappa = torch.tensor(float(np.log(args.kappa_initial)), device=device, requires_grad=True)
        self.policy_opt = Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.value_opt = torch.optim.AdamW(value_net.parameters(), lr=args.lr_value)
        self.kappa_opt = torch.optim.Adam([self.log_kappa], lr=args.kappa_lr)
        self.buffer, self.rng = deque(maxlen=args.buffer_factor * args.k_ppo), np.random.default_rng(args.seed)
        self.iteration = self.env_steps = self.grad_updates = 0

    def state_dict(self) -> dict:
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        state = {k: getattr(self, k).state_dict() for k in self.NETS} | {k: getattr(self, k) for k in self.KEPT}
        return state | dict(log_kappa=self.log_kappa.detach().cpu(), torch_rng=torch.get_rng_state(), cuda_rng=cuda_rng)

    def load_state_dict(self, state: dict):
        for k in self.NETS:
            getattr(self, k).load_state_dict(state[k])
        self.__dict__.update({k: state[k] for k in self.KEPT})
        self.log_kappa.detach().copy_(state["log_kappa"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def model_checkpoint(model, ckpt: dict, score: float) -> dict:
    """The finetuned DT in pretrain_dt.py's checkpoint format, so `load_model` reads it."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    pretrained = {k: v for k, v in ckpt.items() if k not in ("finetune", "args")}
    return pretrained | {"eval_normalized_score": score, "state_dict": weights}


def main(args: Args) -> float:
    t0 = time.time()  # --max-seconds counts from here, loading included
    positive = "n_batch c_online c_train k_ppo learning_rate lr_value kappa_initial kappa_lr updates_per_iter ref_update_every"
    positive += " buffer_factor value_hidden value_scale eval_episodes eval_context_len max_episode_steps"
    check_args(args, positive=positive.split(), nonnegative=("num_iterations",), unit=("gamma", "gae_lambda"))
    args = apply_presets(resume_args(args, budget=("num_iterations", "total_env_steps", "max_seconds"))[0])
    device = seed_everything(args)

    # Start: the pretrained DT (made first if missing) or the run state to resume; envs, value net, optimisers, logging
    path = Path(args.resume) if args.resume else ensure_checkpoint(args)
    model, ckpt = load_model(path, device, flag="--resume" if args.resume else "--checkpoint")
    run_name = ckpt["finetune"]["run_name"] if args.resume else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(t0)}"
    env_kw = {"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}
    train_envs, eval_envs = ([make_env(args.env_id, **env_kw) for _ in range(n)] for n in (args.k_ppo, args.eval_episodes))
    env, cfg = train_envs[0], ckpt["model_config"]
    dims, ckpt_dims = (env.observation_space.shape[0], env.action_space.shape[0]), (cfg["state_dim"], cfg["act_dim"])
    if dims != ckpt_dims:
        raise UserError(f"the checkpoint's state/action dims {ckpt_dims} are not {args.env_id}'s {dims}")
    horizon = env.spec.max_episode_steps  # V is scaled to the discounted return the DT aims at: AdamW fits O(1) outputs
    scale = args.value_scale or ckpt["eval_rtg"] / horizon * min(horizon, 1 / (1 - args.gamma))
    mujoco = env_family(args.env_id)[0] == "mujoco"
    value_net = ValueNet(dims[0], args.value_hidden or (256 if mujoco else 512), layer_norm=not mujoco, scale=scale)
    learner = Learner(args, model, value_net.to(device), device)
    if args.resume:
        learner.load_state_dict(ckpt["finetune"])
    writer = make_writer(args, run_name, purge_step=learner.iteration + 1 if args.resume else None)
    state_path = Path(args.save_path or f"{args.runs_dir}/{run_name}/state.pt")
    if args.save_every:
        print(f"run state: {state_path} (continue with --resume {state_path})", flush=True)
    if args.capture_video:
        eval_envs[0] = gym.wrappers.RecordVideo(make_env(args.env_id, render_mode="rgb_array", **env_kw), f"videos/{run_name}")
    target_entropy = -float(dims[1]) if args.target_entropy is None else args.target_entropy

    # Iteration 0: the loaded checkpoint before any update (a resumed run logged its own already)
    score = ckpt["eval_normalized_score"] if args.resume else evaluate(model, eval_envs, args, ckpt, writer, it=0)
    start_time, start_steps = time.time(), learner.env_steps
    pbar = tqdm(total=args.num_iterations, initial=learner.iteration, desc="ppo-dt")
    for it in range(learner.iteration + 1, args.num_iterations + 1):
        # ALGO LOGIC, line 2: K_PPO stochastic rollouts conditioned on g_online; FIFO buffer update
        seeds = train_seeds(learner.rng, args.k_ppo)
        trajs = rollout(model, train_envs, seeds, args.g_online, ckpt, args.c_online, deterministic=False)
        learner.buffer.extend(trajs)
        learner.env_steps += sum(len(t["rewards"]) for t in trajs)

        # ALGO LOGIC, line 3: GAE over the buffer with the current value net (no relabeling unless --relabel)
        flat = flatten_buffer(learner.buffer, learner.value_net, args.gamma, args.gae_lambda, args.relabel, ckpt["rtg_scale"])

        # ALGO LOGIC, lines 4-6: sub-trajectory batches, Eq. 5 for the policy, Eq. 6 for the value net
        stats = []
        for _ in range(args.updates_per_iter):
            batch = sample_batch(flat, args.n_batch, args.c_train, args.c_online, learner.rng, device)
            stats.append(ppo_update(learner, batch, args, target_entropy, ckpt))
        learner.iteration = it
        if not all(p.isfinite().all() for p in [*model.parameters(), *learner.value_net.parameters(), learner.log_kappa]):
            kept = f"last good state kept at {state_path}" if state_path.exists() else "no state saved yet"
            raise UserError(f"non-finite weights after iteration {it}; stopped, {kept}")  # nothing non-finite is saved

        # Evaluation and logging: global step = iteration
        score = evaluate(model, eval_envs, args, ckpt, writer, it)
        sps = (learner.env_steps - start_steps) / (time.time() - start_time)
        var = np.var(flat["returns"])
        logs = {f"losses/{k}": np.mean([s[k] for s in stats]) for k in stats[0]}
        logs["losses/explained_variance"] = np.nan if var == 0 else 1 - np.var(flat["returns"] - flat["values"]) / var
        logs["charts/episodic_return"] = np.mean([t["rewards"].sum() for t in trajs])
        logs |= {"charts/env_steps": learner.env_steps, "charts/grad_updates": learner.grad_updates, "charts/SPS": sps}
        for tag, value in logs.items():
            writer.add_scalar(tag, value, it)
        pbar.update()
        pbar.set_postfix(score=f"{score:.1f}", sps=f"{sps:.0f}")

        stop = 0 < args.total_env_steps <= learner.env_steps or 0 < args.max_seconds <= time.time() - t0
        if args.save_every and (it % args.save_every == 0 or it == args.num_iterations or stop):
            state = {"finetune": learner.state_dict() | {"run_name": run_name}, "args": asdict(args)}
            save_atomic(state_path, model_checkpoint(model, ckpt, score) | state)
        if stop:
            pbar.total = it  # a budget ended the run: the bar ends full
            break
    pbar.close()
    if args.save_model:
        save_atomic(f"{args.runs_dir}/{run_name}/{args.exp_name}.pt", model_checkpoint(model, ckpt, score))
    writer.close()
    return score


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
