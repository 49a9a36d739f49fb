"""PPO-DT: online finetuning of a pretrained Decision Transformer with PPO, GAE and no hindsight relabeling.

Paper: "Online Finetuning Decision Transformers with Pure RL Gradients" (Luo & Zhu), Section 3.3.2,
Appendix B.1-B.2, Algorithm 2, Eqs. 4-6, Tables 5 and 7. Each iteration rolls out K_PPO trajectories
conditioned on g_online, keeps their RTG tokens and log-probs exactly as used at rollout, computes GAE with an
MLP value network, and maximises the token-level clipped PPO objective minus kl_coef x KL to a slowly refreshed
reference policy plus kappa x entropy (kappa a dual variable toward -dim(A)) on sub-trajectories of a FIFO buffer.

Example (offline; pretrains the checkpoint first if it is missing):
    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) \
        python ppo_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0
"""

import copy
import ctypes
import os
import random
import shlex
import subprocess
import sys
import time
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
    """pretrained checkpoint; default `checkpoints/{env_id}__{dataset}__s{seed}[__cpu].pt`, pretrained if missing"""
    model_size: Literal["paper", "cpu"] = "paper"
    """size of the DT that pretrain_dt.py makes when the checkpoint is missing"""
    pretrain_extra_args: str = ""
    """extra pretrain_dt.py flags (one shell-quoted string) used when the checkpoint has to be made"""
    torch_threads: int = 0
    """CPU threads for torch (0: torch's default); 1 is much faster for small models on a busy CPU"""

    num_iterations: int = 100
    """outer iterations of Algorithm 2 (0: evaluate the checkpoint and exit)"""
    total_env_steps: int = 0
    """stop after the iteration at which training env steps reach this (0: no budget; eval steps do not count)"""
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
    """write the run state every this many iterations and at the end (0: never)"""
    save_path: Optional[str] = None
    """where the run state goes; default `{runs_dir}/{run_name}/state.pt`"""
    save_model: bool = False
    """if toggled, also write the finetuned DT as a checkpoint to `{runs_dir}/{run_name}/{exp_name}.pt` at the end"""
    resume: Optional[str] = None
    """a run state written by --save-every: continue that run bit-exactly from its next iteration, with its own
    settings; only the RUN_CONTROL flags come from this command"""
    max_episode_steps: Optional[int] = None
    """cap on episode length (a time-limit truncation, bootstrapped); default the env's own limit"""

    # Table 7 (None: the --dataset row, see `apply_presets`)
    n_batch: Optional[int] = None
    """sub-trajectories per gradient update (Table 7: 256 MuJoCo/AntMaze, 512 Adroit)"""
    c_online: Optional[int] = None
    """context length at rollout and training (Table 7: 1, 5 for Hammer and AntMaze umaze-diverse)"""
    c_train: Optional[int] = None
    """sub-trajectory length L in steps; default c_online. Each step is scored under its own rollout context"""
    g_online: Optional[float] = None
    """initial RTG of training rollouts, raw reward units (Table 7: 7200 Hopper, 3000 Door, ...)"""
    k_ppo: Optional[int] = None
    """trajectories rolled out per iteration (Table 7: 8, 16 Door/Hammer)"""
    learning_rate: Optional[float] = None
    """LAMB learning rate of the DT (Table 7: 5e-5 MuJoCo/AntMaze, 3e-5 Adroit)"""
    lr_value: Optional[float] = None
    """AdamW learning rate of the value MLP (Table 7: 1e-3 MuJoCo/AntMaze, 2e-4 Adroit)"""
    kappa_initial: Optional[float] = None
    """initial entropy dual variable (Table 7)"""

    updates_per_iter: int = 8
    """gradient updates per iteration, each on n_batch sub-trajectories (Sec. 4.2: "8 x 256")"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon (Table 7)"""
    gamma: float = 0.99
    """GAE discount (Table 7)"""
    gae_lambda: float = 0.95
    """GAE lambda (Table 7)"""
    kl_coef: float = 1e-3
    """coefficient of KL(pi || pi_ref) (Table 5's beta)"""
    ref_update_every: int = 4
    """copy the policy into the reference policy every this many updates (as GRPO-DT)"""
    buffer_factor: int = 4
    """the FIFO trajectory buffer holds buffer_factor x K_PPO trajectories (App. B.1)"""
    norm_adv: bool = True
    """normalise advantages over each sub-trajectory batch (App. B.2)"""
    relabel: bool = False
    """hindsight-relabel stored RTGs with achieved returns (ODT); reproduces the failure of Sec. 3.1"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip for the policy and the value network (Table 5)"""
    weight_decay: float = 1e-4
    """LAMB weight decay of the policy (Table 5)"""
    kappa_lr: float = 1e-4
    """Adam learning rate of log(kappa) (ODT's temperature learning rate)"""
    target_entropy: Optional[float] = None
    """entropy lower bound rho; default -dim(A) (Table 5)"""
    value_hidden: Optional[int] = None
    """value MLP width; default 256 MuJoCo, 512 otherwise (Table 5)"""
    value_layer_norm: Optional[bool] = None
    """LayerNorm in the value MLP; default on for Adroit and AntMaze (App. B.1)"""
    value_scale: Optional[float] = None
    """the value MLP outputs V / value_scale; default eval_rtg / horizon x min(horizon, 1/(1-gamma))"""


# Flags a resumed run takes from its new command line; every other one comes from the saved run (resumed_args).
RUN_CONTROL = (
    "num_iterations total_env_steps max_seconds eval_episodes save_every save_path save_model resume runs_dir cuda track "
    "wandb_project_name wandb_entity capture_video torch_threads"
).split()


# ---------------------------------------------------------------- envs
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


# Table 7: (n_batch, c_online, g_online, k_ppo, learning_rate, lr_value, kappa_initial) per (env key, dataset kind).
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
FAMILY_DEFAULT_KIND = {"mujoco": "medium", "adroit": "human", "antmaze": "umaze"}


def apply_presets(args: Args) -> Args:
    """A copy of args with every Table 7 field left at None set from the --dataset row, and c_train from c_online.

    The row is picked by the dataset's last part without version (local/hopper/medium-v0 -> medium); names without
    a row of their own (medium-replay, expert, ...) get the MuJoCo "medium", Adroit "human" or AntMaze "umaze" row.
    HalfCheetah, absent from Table 7, uses MuJoCo medium with g_online 12000."""
    family, key = env_family(args.env_id)
    kind = args.dataset.rstrip("/").rsplit("/", 1)[-1].split("-v")[0]
    row = TABLE7.get((key, kind)) or TABLE7[(key, FAMILY_DEFAULT_KIND[family])]
    names = ("n_batch", "c_online", "g_online", "k_ppo", "learning_rate", "lr_value", "kappa_initial")
    args = replace(args, **{k: v for k, v in zip(names, row) if getattr(args, k) is None})
    return replace(args, c_train=args.c_train or args.c_online, eval_context_len=args.eval_context_len or args.c_online)


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


class ValueNet(nn.Module):
    """V(s): 2 hidden SiLU layers (Table 5), optional LayerNorm; outputs scale x MLP so the MLP works at O(1)."""

    def __init__(self, state_dim: int, hidden: int, layer_norm: bool, scale: float):
        super().__init__()
        norm = partial(nn.LayerNorm, hidden) if layer_norm else nn.Identity
        self.net = nn.Sequential(
            nn.Linear(state_dim, hidden), norm(), nn.SiLU(), nn.Linear(hidden, hidden), norm(), nn.SiLU(), nn.Linear(hidden, 1)
        )
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, states):
        return self.scale * self.net(states).squeeze(-1)


# ---------------------------------------------------------------- algorithm pieces
def relabel_rtg(rewards: np.ndarray, rtg_scale: float) -> np.ndarray:
    """ODT's hindsight relabeling: the achieved suffix sums g_t = sum_{k>=t} r_k, scaled like RTG tokens."""
    return (np.cumsum(rewards[::-1])[::-1] * rtg_scale).astype(np.float32)


def compute_gae(rewards, values, last_value, terminated, gamma, lam):
    """Eq. 4 for one trajectory. values = V(s_0..s_{T-1}); V(s_T) = last_value unless the episode terminated.

    Time-limit truncation is not termination: the state after the last step still has a value, so it is
    bootstrapped (ODT+TD3 and CleanRL's PPO treat truncation as terminal)."""
    next_values = np.append(values[1:], 0.0 if terminated else last_value)
    deltas = rewards + gamma * next_values - values
    adv, acc = np.zeros(len(rewards), np.float32), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = deltas[t] + gamma * lam * acc
        adv[t] = acc
    return adv


def normalize_advantages(adv: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std over the batch (Huang et al., 2022)."""
    return (adv - adv.mean()) / (adv.std() + 1e-8)


def ppo_policy_loss(new_logp, old_logp, adv, clip_coef):
    """Eq. 5's clipped surrogate with token-level ratios (to minimise), plus approx KL and clip fraction."""
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()
    loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_coef, 1 + clip_coef) * adv).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()  # Schulman's low-variance estimator, as CleanRL
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return loss, approx_kl, clipfrac


def value_loss(pred, target):
    """Eq. 6: squared error to V_target = A + V_old."""
    return F.mse_loss(pred, target)


def explained_variance(pred: np.ndarray, target: np.ndarray) -> float:
    var = np.var(target)
    return float("nan") if var == 0 else float(1 - np.var(target - pred) / var)


@torch.no_grad()
def rollout(model, envs, seeds, target_rtg, meta, deterministic, check=None):
    """One episode per env, all stepped in lockstep with ONE batched forward per step over the live members.

    meta: rtg_scale, context_len, state_mean, state_std, device, action_margin, censor_bound. `check(action=...)`, if
    given, sees the policy's output at every step before an action is drawn from it. Returns per-episode dicts of the exact
    tokens the policy saw: normalised states, RTG tokens (scaled), executed actions, their log-probs, rewards,
    whether it terminated, and the normalised final state."""
    device, rtg_scale = meta["device"], meta["rtg_scale"]
    n, K, S, A = len(envs), meta["context_len"], len(meta["state_mean"]), envs[0].action_space.shape[0]

    def norm(o):
        return (torch.as_tensor(np.asarray(o), dtype=torch.float32, device=device) - meta["state_mean"]) / meta["state_std"]

    obs = [env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]
    states, actions = torch.zeros(n, K, S, device=device), torch.zeros(n, K, A, device=device)
    rtg, mask = torch.zeros(n, K, 1, device=device), torch.zeros(n, K, dtype=torch.bool, device=device)
    target = torch.full((n,), target_rtg * rtg_scale, device=device)
    rec = [{k: [] for k in ("states", "rtg", "actions", "logp", "rewards")} for _ in range(n)]
    alive, done = np.ones(n, dtype=bool), [None] * n
    while alive.any():
        live = torch.as_tensor(np.flatnonzero(alive), device=device)
        # Shift the context one step left; write the newest state and RTG in the last slot (left padding).
        states, actions, rtg, mask = (x.roll(-1, dims=1) for x in (states, actions, rtg, mask))
        states[live, -1] = norm(np.stack([obs[i] for i in live.tolist()]))
        rtg[:, -1, 0], actions[:, -1], mask[:, -1] = target, 0.0, True
        mean, log_std = (x[:, -1] for x in model(rtg[live], states[live], actions[live], mask[live]))
        if check is not None:
            check(action=mean + log_std)  # before sampling: a NaN scale would crash torch.normal
        # Clamped so the stored action has a finite atanh: rollout and training log-probs are computed alike.
        act = torch.tanh(mean) if deterministic else squashed_gaussian(mean, log_std).sample().clamp(-1 + 1e-6, 1 - 1e-6)
        logp = (
            torch.zeros(len(live), device=device)
            if deterministic
            else action_log_prob(mean, log_std, act, meta["action_margin"], meta["censor_bound"])
        )
        actions[live, -1] = act
        step_tokens = [x.cpu().numpy() for x in (states[live, -1], rtg[live, -1, 0], act, logp)]
        for j, i in enumerate(live.tolist()):
            o, r, term, trunc, _ = envs[i].step(step_tokens[2][j])
            for k, v in zip(rec[i], [x[j] for x in step_tokens] + [r]):
                rec[i][k].append(v)
            obs[i], target[i] = o, target[i] - r * rtg_scale
            if term or trunc:
                alive[i], done[i] = False, (term, norm(o).cpu().numpy())
    keys = ("states", "rtg", "actions", "logp", "rewards")
    return [
        {**{k: np.array(r[k], np.float32) for k in keys}, "return": float(np.sum(r["rewards"])), "terminated": bool(d[0])}
        | {"last_state": d[1]}
        for r, d in zip(rec, done)
    ]


@torch.no_grad()
def flatten_buffer(buffer, value_net, gamma, lam, relabel, rtg_scale, device):
    """Algorithm 2 line 3: GAE for every step of every buffered trajectory under the current value net.

    RTG tokens are the rollout's own unless `relabel`, which swaps in achieved returns (the failure mode)."""
    cat = {key: np.concatenate([t[key] for t in buffer]) for key in ("states", "actions", "rtg", "logp")}
    values = value_net(torch.as_tensor(cat["states"], device=device)).cpu().numpy()
    last_values = value_net(torch.as_tensor(np.stack([t["last_state"] for t in buffer]), device=device)).cpu().numpy()
    lengths = np.array([len(t["rewards"]) for t in buffer])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    segments = zip(buffer, offsets, lengths, last_values)
    adv = [compute_gae(t["rewards"], values[o : o + n], v, t["terminated"], gamma=gamma, lam=lam) for t, o, n, v in segments]
    adv = np.concatenate(adv)
    if relabel:
        cat["rtg"] = np.concatenate([relabel_rtg(t["rewards"], rtg_scale) for t in buffer])
    return dict(cat, adv=adv, returns=adv + values, values=values, lengths=lengths, offsets=offsets)


def sample_batch(flat, n_batch, sub_len, context_len, rng, device):
    """Lines 4-5: trajectories drawn in proportion to length, one sub-trajectory of sub_len steps from each.

    Every step of a sub-trajectory gets its own window of the context_len steps ending at it (left padding
    at the episode start): exactly the context it was sampled under, so old log-probs = rollout log-probs."""
    lengths, offsets = flat["lengths"], flat["offsets"]
    idx = rng.choice(len(lengths), size=n_batch, p=lengths / lengths.sum())
    start = rng.integers(0, np.maximum(lengths[idx] - sub_len, 0) + 1)
    steps = start[:, None] + np.arange(sub_len)[None, :]
    valid = steps < lengths[idx, None]  # sub-trajectories of short episodes are cut at their end
    steps, traj = steps[valid], idx[np.nonzero(valid)[0]]
    window = steps[:, None] - context_len + 1 + np.arange(context_len)[None, :]
    src = offsets[traj, None] + np.maximum(window, 0)
    token = offsets[traj] + steps
    batch = dict(rtg=flat["rtg"][src][..., None], states=flat["states"][src], actions=flat["actions"][src], mask=window >= 0)
    batch.update(
        act=flat["actions"][token], old_logp=flat["logp"][token], adv=flat["adv"][token], returns=flat["returns"][token]
    )
    batch["value_states"] = flat["states"][token]
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


class Learner:
    """What the updates change and --resume restores: networks, optimisers, log(kappa), buffer, rng and counters."""

    STATEFUL = ("value_net", "ref_model", "policy_opt", "value_opt", "kappa_opt")  # the DT itself is the checkpoint's

    def __init__(self, args: Args, model: DecisionTransformer, value_net: ValueNet, device):
        self.model, self.ref_model, self.value_net = model, copy.deepcopy(model).requires_grad_(False), value_net
        self.log_kappa = torch.tensor(float(np.log(args.kappa_initial)), device=device, requires_grad=True)
        self.policy_opt = Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.value_opt = torch.optim.AdamW(value_net.parameters(), lr=args.lr_value)
        self.kappa_opt = torch.optim.Adam([self.log_kappa], lr=args.kappa_lr)
        self.buffer, self.rng = deque(maxlen=args.buffer_factor * args.k_ppo), np.random.default_rng(args.seed)
        self.iteration = self.env_steps = self.grad_updates = 0

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).state_dict() for name in self.STATEFUL}
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        state.update(log_kappa=self.log_kappa.detach().cpu(), buffer=list(self.buffer), numpy_rng=self.rng.bit_generator.state)
        state.update(torch_rng=torch.get_rng_state(), cuda_rng=cuda_rng, iteration=self.iteration, env_steps=self.env_steps)
        return state | {"grad_updates": self.grad_updates}

    def load_state_dict(self, state: dict):
        for name in self.STATEFUL:
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_kappa.copy_(state["log_kappa"])
        self.buffer.extend(state["buffer"])
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.iteration, self.env_steps, self.grad_updates = state["iteration"], state["env_steps"], state["grad_updates"]


STAT_NAMES = ("policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy", "kappa", "kl_ref")


def ppo_update(learner: Learner, b: dict, args: Args, target_entropy: float, likelihood: dict) -> list[float]:
    """Lines 5-6 on one batch: Eq. 5 (minus kl_coef x KL to pi_ref, plus kappa x entropy) for the policy, the dual
    step of kappa, Eq. 6 for the value net; the reference policy is refreshed every ref_update_every updates.
    `likelihood`: the checkpoint's action_margin and censor_bound, as the rollout scored the actions with."""
    model, ref_model = learner.model, learner.ref_model
    mean, log_std = (x[:, -1] for x in model(b["rtg"], b["states"], b["actions"], b["mask"]))
    dist = squashed_gaussian(mean, log_std)
    adv = normalize_advantages(b["adv"]) if args.norm_adv else b["adv"]
    logp = action_log_prob(mean, log_std, b["act"], likelihood["action_margin"], likelihood["censor_bound"])
    pg_loss, approx_kl, clipfrac = ppo_policy_loss(logp, b["old_logp"], adv, args.clip_coef)
    entropy = -dist.log_prob(dist.rsample()).mean()  # single-sample estimate: no closed form after tanh
    with torch.no_grad():
        ref_mean, ref_log_std = (x[:, -1] for x in ref_model(b["rtg"], b["states"], b["actions"], b["mask"]))
    pi, ref = Normal(mean, log_std.exp(), validate_args=False), Normal(ref_mean, ref_log_std.exp(), validate_args=False)
    kl_ref = kl_divergence(Independent(pi, 1), Independent(ref, 1)).mean()
    kappa = learner.log_kappa.exp()
    loss = pg_loss + args.kl_coef * kl_ref - kappa.detach() * entropy
    learner.policy_opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    learner.policy_opt.step()
    kappa_loss = kappa * (entropy.detach() - target_entropy)  # kappa rises while entropy < target
    learner.kappa_opt.zero_grad()
    kappa_loss.backward()
    learner.kappa_opt.step()
    v_loss = value_loss(learner.value_net(b["value_states"]), b["returns"])
    learner.value_opt.zero_grad()
    v_loss.backward()
    nn.utils.clip_grad_norm_(learner.value_net.parameters(), args.max_grad_norm)
    learner.value_opt.step()
    learner.grad_updates += 1
    if learner.grad_updates % args.ref_update_every == 0:  # the slowly refreshed reference policy
        ref_model.load_state_dict(model.state_dict())
    return [x.item() for x in (pg_loss, v_loss, approx_kl, clipfrac, entropy, kappa, kl_ref)]


# ---------------------------------------------------------------- run state
def model_checkpoint(model, ckpt: dict, score: float) -> dict:
    """The finetuned DT in the pretrained checkpoint format (loadable by `load_model`)."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v for k, v in ckpt.items() if k != "finetune"} | {"eval_normalized_score": score, "state_dict": state_dict}


def save_state(path: Path, learner: Learner, ckpt: dict, score: float, **extra):
    """The run state: a DT checkpoint plus a `finetune` dict (learner state and `extra`); atomic (tmp + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = model_checkpoint(learner.model, ckpt, score) | {"finetune": learner.state_dict() | extra}
    torch.save(payload, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # a kill never leaves half a file


def check_finite(it: int, state_path: Path, **values):
    """Stop before a non-finite value can be saved: the last good run state on disk is left as it is."""
    for what, x in values.items():
        if not torch.isfinite(torch.as_tensor(x, dtype=torch.float64)).all():
            kept = f"last good state kept at {state_path}" if state_path.exists() else "no state saved yet"
            raise UserError(f"non-finite {what} at iteration {it}; stopped, {kept}")


# ---------------------------------------------------------------- setup and logging
def make_envs(args: Args, run_name: str) -> tuple[list, list]:
    """K_PPO training envs and eval_episodes evaluation envs (the first one recorded with --capture-video)."""
    env_kw = {"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}
    train_envs = [make_env(args.env_id, **env_kw) for _ in range(args.k_ppo)]
    eval_envs = [make_env(args.env_id, **env_kw) for _ in range(args.eval_episodes)]
    if args.capture_video and eval_envs:
        eval_envs[0] = gym.wrappers.RecordVideo(make_env(args.env_id, render_mode="rgb_array", **env_kw), f"videos/{run_name}")
    return train_envs, eval_envs


def evaluate(model, eval_envs, args: Args, ckpt: dict, meta: dict, writer, it: int) -> tuple[float, float]:
    """tanh(mean) episodes (dropout off) from `eval_seeds`, at --eval-rtg and --eval-context-len."""
    model.eval()
    seeds, rtg = eval_seeds(args.seed, len(eval_envs)), ckpt["eval_rtg"] if args.eval_rtg is None else args.eval_rtg
    trajs = rollout(model, eval_envs, seeds, rtg, {**meta, "context_len": args.eval_context_len}, deterministic=True)
    rets = np.array([e["return"] for e in trajs])  # summed in float64, as every script
    score = float(np.mean(100.0 * (rets - ckpt["ref_min_score"]) / (ckpt["ref_max_score"] - ckpt["ref_min_score"])))
    writer.add_scalar("charts/normalized_score", score, it)
    writer.add_scalar("charts/eval_return", rets.mean(), it)
    return score, float(rets.mean())


def log_iteration(writer, it: int, stats: list, flat: dict, trajs: list, learner: Learner, sps: float):
    for name, value in zip(STAT_NAMES, np.mean(stats, axis=0)):
        writer.add_scalar(f"losses/{name}", value, it)
    writer.add_scalar("losses/explained_variance", explained_variance(flat["values"], flat["returns"]), it)
    writer.add_scalar("charts/episodic_return", np.mean([t["rewards"].sum() for t in trajs]), it)
    writer.add_scalar("charts/env_steps", learner.env_steps, it)
    writer.add_scalar("charts/grad_updates", learner.grad_updates, it)
    writer.add_scalar("charts/SPS", sps, it)


def out_of_budget(args: Args, env_steps: int, t0: float) -> bool:
    return bool(
        args.total_env_steps and env_steps >= args.total_env_steps or args.max_seconds and time.time() - t0 >= args.max_seconds
    )


def make_value_net(args: Args, ckpt: dict, ckpt_path: Path, device) -> ValueNet:
    """The value MLP (Table 5 / App. B.1 defaults), after checking that the env matches the DT."""
    family, _ = env_family(args.env_id)
    probe = make_env(args.env_id)
    state_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    cfg = ckpt["model_config"]
    if (cfg["state_dim"], cfg["act_dim"]) != (state_dim, act_dim):
        raise UserError(
            f"{ckpt_path} has state/action dims ({cfg['state_dim']}, {cfg['act_dim']}) but {args.env_id} "
            f"has ({state_dim}, {act_dim})"
        )
    horizon = args.max_episode_steps or probe.spec.max_episode_steps
    hidden = args.value_hidden or (256 if family == "mujoco" else 512)
    layer_norm = family != "mujoco" if args.value_layer_norm is None else args.value_layer_norm
    scale = args.value_scale or ckpt["eval_rtg"] / horizon * min(horizon, 1 / (1 - args.gamma))
    return ValueNet(state_dim, hidden=hidden, layer_norm=layer_norm, scale=scale).to(device)


def seed_everything(args: Args) -> torch.device:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def start_run(args: Args, ckpt: dict, t0: float) -> tuple[str, Path, SummaryWriter]:
    """The run's name (a resumed run keeps its own), its state path (printed once, for --resume) and its writer."""
    run_name = ckpt["finetune"]["run_name"] if args.resume else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(t0)}"
    state_path = Path(args.save_path or f"{args.runs_dir}/{run_name}/state.pt")
    print(f"run state: {state_path} (continue with --resume {state_path})", flush=True)
    if args.track:
        import wandb

        config = dict(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name)
        wandb.init(**config, sync_tensorboard=True, save_code=True)
    writer = SummaryWriter(f"{args.runs_dir}/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return run_name, state_path, writer


# ---------------------------------------------------------------- main
def main(args: Args):
    t0 = time.time()  # --max-seconds counts from here, loading included
    fix_malloc_mmap_threshold()
    args = apply_presets(resumed_args(args, RUN_CONTROL))
    device = seed_everything(args)

    # Start: the checkpoint (pretrained on demand) or the run state to resume, value net, optimisers, envs
    ckpt_path = Path(args.resume) if args.resume else ensure_checkpoint(args)
    model, ckpt = load_model(ckpt_path, device)
    if args.resume and "finetune" not in ckpt:
        raise UserError(f"--resume {ckpt_path} has no 'finetune' state; pass a pretrained one with --checkpoint")
    value_net = make_value_net(args, ckpt, ckpt_path, device)
    act_dim = ckpt["model_config"]["act_dim"]
    target_entropy = args.target_entropy if args.target_entropy is not None else -float(act_dim)
    learner = Learner(args, model, value_net, device)
    if args.resume:
        learner.load_state_dict(ckpt["finetune"])
    run_name, state_path, writer = start_run(args, ckpt, t0)
    train_envs, eval_envs = make_envs(args, run_name)
    meta = dict(rtg_scale=ckpt["rtg_scale"], context_len=args.c_online, state_mean=ckpt["state_mean"].to(device))
    meta.update(state_std=ckpt["state_std"].to(device), device=device, action_margin=ckpt.get("action_margin", 1e-6))
    meta.update(censor_bound=ckpt.get("censor_bound"))
    gae = dict(gamma=args.gamma, lam=args.gae_lambda, relabel=args.relabel, rtg_scale=ckpt["rtg_scale"], device=device)
    batching = dict(n_batch=args.n_batch, sub_len=args.c_train, context_len=args.c_online, device=device)

    # Iteration 0: the loaded checkpoint, before any update
    start_it = learner.iteration + 1
    score, eval_return = evaluate(model, eval_envs, args=args, ckpt=ckpt, meta=meta, writer=writer, it=start_it - 1)
    tqdm.write(
        f"iteration {start_it - 1}: eval return {eval_return:.1f}, normalized score {score:.1f} "
        f"(pretrained: {ckpt['eval_normalized_score']:.1f})"
    )
    start_time, start_steps = time.time(), learner.env_steps
    pbar = tqdm(range(start_it, args.num_iterations + 1), desc="ppo-dt", initial=start_it - 1, total=args.num_iterations)
    for it in pbar:
        # ALGO LOGIC, line 2: K_PPO stochastic rollouts conditioned on g_online; FIFO buffer update
        model.eval()
        seeds = train_seeds(learner.rng, args.k_ppo)
        check = partial(check_finite, it, state_path)
        trajs = rollout(model, train_envs, seeds, args.g_online, meta, deterministic=False, check=check)
        learner.buffer.extend(trajs)
        learner.env_steps += sum(len(t["rewards"]) for t in trajs)

        # ALGO LOGIC, line 3: GAE over the buffer with the current value net (no relabeling unless --relabel)
        flat = flatten_buffer(learner.buffer, value_net, **gae)
        check(value=flat["values"])

        # ALGO LOGIC, lines 4-6: sub-trajectory batches, Eq. 5 for the policy, Eq. 6 for the value net
        model.train()  # dropout is 0, so train mode changes nothing: the ratio is exactly 1 at the first update
        stats = []
        for _ in range(args.updates_per_iter):
            b = sample_batch(flat, rng=learner.rng, **batching)
            stats.append(ppo_update(learner, b, args, target_entropy, meta))
            check(loss=stats[-1])
        learner.iteration = it

        # Evaluation and logging: global step = iteration
        score, eval_return = evaluate(model, eval_envs, args=args, ckpt=ckpt, meta=meta, writer=writer, it=it)
        sps = (learner.env_steps - start_steps) / (time.time() - start_time)
        log_iteration(writer, it, stats=stats, flat=flat, trajs=trajs, learner=learner, sps=sps)
        pbar.set_postfix(score=f"{score:.1f}", ret=f"{eval_return:.0f}", sps=f"{sps:.0f}")
        tqdm.write(
            f"iteration {it}: eval return {eval_return:.1f}, normalized score {score:.1f}, "
            f"env steps {learner.env_steps}, SPS {sps:.0f}"
        )
        stop = out_of_budget(args, learner.env_steps, t0)
        if args.save_every and (it % args.save_every == 0 or it == args.num_iterations or stop):
            save_state(state_path, learner, ckpt, score, run_name=run_name, args=asdict(args))
        if stop:
            break
    if args.save_model:
        torch.save(model_checkpoint(model, ckpt, score), f"{args.runs_dir}/{run_name}/{args.exp_name}.pt")
    writer.close()
    return score


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
