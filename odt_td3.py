"""ODT and ODT+TD3: online finetuning of a pretrained Decision Transformer with hindsight-relabeled supervised
learning, optionally plus TD3 gradients from a twin critic.

Baselines of "Online Finetuning Decision Transformers with Pure RL Gradients" (Luo & Zhu), Sections 2 and 3.1:
ODT (Zheng et al., 2022) and ODT+TD3 (Yan et al., 2024, "RL gradients as vitamin"), from pretrain_dt.py's checkpoint.

  --algo odt_td3 (default): deterministic actor a = tanh(mean) read from the checkpoint's Gaussian head, loss
      MSE(a, a_data) + rl_coef * mean(-Q1(s, a)), Gaussian exploration noise; twin critic trained by TD3.
  --algo odt: the stochastic tanh-Gaussian actor, NLL - temperature * entropy with the temperature as a dual
      variable toward the target entropy; no critic (alpha = 0).

Example (offline machine, the shared data):
    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) \
        python odt_td3.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --algo odt_td3
"""

import copy
import ctypes
import os
import random
import shlex
import subprocess
import sys
import time
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
from torch.distributions import Independent, Normal, TanhTransform, TransformedDistribution
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

ALGOS = ("odt_td3", "odt")


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

    algo: Literal["odt_td3", "odt"] = "odt_td3"
    """odt_td3 (deterministic actor + TD3 critic gradients) or odt (stochastic NLL + entropy actor, alpha = 0)"""
    rl_coef: float = 0.1
    """alpha, weight of mean(-Q1(s, a_pred)) in the odt_td3 actor loss (Yan et al.); --algo odt uses 0"""
    num_iterations: int = 300
    """outer iterations: one training rollout, the updates, an evaluation; 0 only evaluates the checkpoint"""
    total_env_steps: int = 0
    """training env-step budget (0: none); stop after the iteration that reaches it; eval steps do not count"""
    max_seconds: float = 0
    """wall-clock budget in seconds, counted from the start of main (before loading; 0: none); stop after the iteration
    that reaches it"""
    actor_updates: int = 300
    """DT (actor) updates per iteration (ODT, ODT+TD3)"""
    critic_updates: Optional[int] = None
    """critic updates per iteration; default 600 MuJoCo (actor every 2nd, TD3's delay), 300 Adroit/AntMaze"""
    critic_pretrain_updates: Optional[int] = None
    """critic updates on the offline data before the online phase, DT frozen; default as many as ODT+TD3's critic gets
    while pretraining the DT (10000 MuJoCo, 40000 Adroit, 200000 AntMaze)"""
    n_batch: int = 256
    """segments per update (actor and critic)"""
    context_len: Optional[int] = None
    """training context; default the checkpoint's c_offline"""
    c_online: Optional[int] = None
    """context of the training rollouts (ODT's eval_context_length); default ODT+TD3's: 5 MuJoCo and pen, 1 door, hammer
    and AntMaze"""
    learning_rate: float = 1e-4
    """peak LAMB learning rate of the DT (ODT's online lr)"""
    warmup_updates: int = 0
    """linear lr warm-up of the fresh LAMB state, in DT updates; 0 as ODT+TD3, whose one 10k-update warm-up runs from
    the start of pretraining (pretrain_dt.py's is over by the end of pretraining)"""
    weight_decay: Optional[float] = None
    """LAMB weight decay; default ODT+TD3's: 5e-4 Hopper, 1e-3 Walker2d, 1e-4 HalfCheetah, Ant, Adroit, AntMaze"""
    max_grad_norm: float = 0.25
    """DT gradient-norm clip (ODT+TD3; Table 5 of the GRPO-DT paper says 0.5)"""
    dropout: float = 0.1
    """DT dropout in the finetuning updates (ODT+TD3); rollouts, targets and evaluation run with dropout off"""
    kappa_lr: float = 1e-4
    """Adam lr of log(kappa), ODT's temperature dual variable (--algo odt), initialised from the checkpoint"""
    critic_lr: Optional[float] = None
    """AdamW lr of the critic; default 1e-3 MuJoCo, 2e-4 otherwise"""
    critic_hidden: int = 256
    """width of the critic's two hidden layers"""
    critic_layer_norm: Optional[bool] = None
    """non-affine LayerNorm in the critic; default off for MuJoCo, on otherwise"""
    gamma: Optional[float] = None
    """discount; default 0.99, 0.998 for AntMaze"""
    tau: float = 0.005
    """Polyak rate of the target DT and target critic"""
    explore_noise: float = 0.1
    """std of the Gaussian exploration noise on tanh(mean) (odt_td3 rollouts)"""
    policy_noise: float = 0.2
    """std of TD3's target-policy smoothing noise"""
    noise_clip: float = 0.5
    """clip of the target-policy smoothing noise"""
    g_online: Optional[float] = None
    """RTG conditioning training rollouts; default ODT / Table 6 (Hopper 7200, Walker 10000, Ant 12000, door 3000...)"""
    replay_size: Optional[int] = None
    """trajectories in the FIFO replay buffer; default ODT+TD3's: 1000 MuJoCo, 5000 Adroit, 2000 AntMaze"""
    min_steps_per_iter: Optional[int] = None
    """roll out training episodes until an iteration has this many env steps (ODT+TD3's --minimum_sapairs_per_iter);
    default 1000 for Adroit, AntMaze and random MuJoCo data, else 0 (one episode per iteration)"""
    max_episode_steps: Optional[int] = None
    """cap on the env's time limit, for rollouts and evaluation (tests, quick runs); default the env's own"""
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
    """a run state written by --save-every: continue that run bit-exactly up to --num-iterations, with its own
    settings; only the RUN_CONTROL flags come from this command"""


# Flags a resumed run takes from its new command line; every other one comes from the saved run (resumed_args).
RUN_CONTROL = (
    "num_iterations total_env_steps max_seconds eval_episodes save_every save_path save_model resume runs_dir cuda track "
    "wandb_project_name wandb_entity capture_video"
).split()


# ---------------------------------------------------------------- envs and data
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


G_ONLINE = dict(hopper=7200, walker2d=10000, ant=12000, halfcheetah=12000, door=3000, hammer=4000, pen=6000, antmaze=2)
CRITIC_REWARD_DIVISOR = {"hammer": 1000, "door": 100, "pen": 100, "relocate": 100}


def critic_reward(key: str, rewards):
    """What the critic sees of a reward (Yan et al.): Adroit divided by a constant, AntMaze -1 per step, MuJoCo raw."""
    if key == "antmaze":
        return rewards - 1.0
    return rewards / CRITIC_REWARD_DIVISOR[key] if key in CRITIC_REWARD_DIVISOR else rewards


# ODT+TD3's settings per env family (Yan et al.: get_args.py defaults, the README's commands, trainer.py), then the
# per-env exceptions of those commands; README.md lists each value with its source.
PRESETS = {
    "mujoco": dict(c_online=5, replay_size=1000, min_steps_per_iter=0, weight_decay=5e-4, critic_pretrain_updates=10_000),
    "adroit": dict(c_online=1, replay_size=5000, min_steps_per_iter=1000, weight_decay=1e-4, critic_pretrain_updates=40_000),
    "antmaze": dict(c_online=1, replay_size=2000, min_steps_per_iter=1000, weight_decay=1e-4, critic_pretrain_updates=200_000),
}
PRESETS_BY_KEY = {"pen": dict(c_online=5), "walker2d": dict(weight_decay=1e-3), "halfcheetah": dict(weight_decay=1e-4)}
PRESETS_BY_KEY["ant"] = dict(weight_decay=1e-4)


def apply_presets(args: Args) -> Args:
    """A copy of args with the per-family defaults filled in where left at None (see each field's docstring)."""
    family, key = env_family(args.env_id)
    mujoco = family == "mujoco"
    presets = dict(critic_updates=600 if mujoco else 300, critic_lr=1e-3 if mujoco else 2e-4, critic_layer_norm=not mujoco)
    presets.update(gamma=0.998 if family == "antmaze" else 0.99, g_online=G_ONLINE[key])
    presets.update(PRESETS[family], **PRESETS_BY_KEY.get(key, {}))
    if mujoco and "random" in args.dataset:
        presets["min_steps_per_iter"] = 1000
    args = replace(args, **{k: v for k, v in presets.items() if getattr(args, k) is None})
    return replace(args, eval_context_len=args.eval_context_len or args.c_online)


def load_offline_trajectories(ckpt: dict) -> list[dict]:
    """The checkpoint's dataset as trajectories with T+1 observations (a truncated one bootstraps from the last)."""
    family, _ = env_family(ckpt["env_id"])
    path = (ckpt.get("pretrain_args") or {}).get("dataset_path")
    trajs = []
    if path:
        import h5py

        keys = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")
        with h5py.File(path, "r") as f:
            d = {k: f[k][()] for k in f.keys() if k in keys}
        ends = np.append(np.flatnonzero(d["terminals"] | d["timeouts"]) + 1, len(d["rewards"]))
        nxt = d.get("next_observations", d["observations"])  # without next_observations the last obs is repeated
        for a, b in [(a, b) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends) if b > a]:
            obs = np.concatenate([d["observations"][a:b], nxt[b - 1 : b]])
            trajs.append(dict(observations=obs, actions=d["actions"][a:b], rewards=d["rewards"][a:b]))
            trajs[-1]["terminated"] = bool(d["terminals"][b - 1])
    else:
        import minari

        if ckpt["dataset_id"] not in minari.list_local_datasets():
            cache = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
            raise UserError(
                f"the checkpoint's dataset {ckpt['dataset_id']!r} is not in the local Minari cache ({cache}); "
                "set MINARI_DATASETS_PATH"
            )
        for ep in minari.load_dataset(ckpt["dataset_id"]).iterate_episodes():
            obs = flatten_antmaze_obs(ep.observations) if family == "antmaze" else ep.observations
            trajs.append(dict(observations=obs, actions=ep.actions, rewards=ep.rewards, terminated=bool(ep.terminations[-1])))
    if family == "antmaze":
        trajs = [t for t in trajs if len(t["rewards"]) > 1]  # as pretraining: 1-step trajectories dropped
    return [{**t, **{k: np.asarray(t[k], np.float32) for k in ("observations", "actions", "rewards")}} for t in trajs]


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


class TwinCritic(nn.Module):
    """Two Markovian Q-MLPs (s+a) -> h -> h -> 1, ReLU; optional non-affine LayerNorm (Yan et al., outside MuJoCo)."""

    def __init__(self, state_dim, act_dim, hidden=256, layer_norm=False):
        super().__init__()
        norm = partial(nn.LayerNorm, hidden, elementwise_affine=False) if layer_norm else nn.Identity

        def q_net():
            layers = [nn.Linear(state_dim + act_dim, hidden), norm(), nn.ReLU(), nn.Linear(hidden, hidden), norm(), nn.ReLU()]
            return nn.Sequential(*layers, nn.Linear(hidden, 1))

        self.q1, self.q2 = q_net(), q_net()

    def forward(self, states, actions):
        x = torch.cat([states, actions], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


# ---------------------------------------------------------------- algorithm pieces
def relabel_rtg(rewards: np.ndarray, rtg_scale: float) -> np.ndarray:
    """Hindsight relabeling: the RTG token at t is the achieved return from t on (suffix sum), times the RTG scale."""
    return np.cumsum(np.asarray(rewards, np.float64)[::-1])[::-1] * rtg_scale


def td_target(rewards, terminals, q1_next, q2_next, gamma: float):
    """TD3's clipped double-Q target; only a true termination cuts the bootstrap (a time-limit end does not)."""
    return rewards + gamma * (1.0 - terminals.float()) * torch.min(q1_next, q2_next)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float):
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)


def masked_mean(x, mask):
    m = mask.float()
    return (x * m).sum() / m.sum().clamp(min=1)


class TrajectoryBuffer:
    """ODT's trajectory replay: seeded with the top-`capacity` offline trajectories by return, held in ascending
    return order so the first online trajectories replace the worst offline ones; after that, oldest first."""

    def __init__(self, trajs: list[dict], capacity: int):
        self.trajs = sorted(trajs, key=lambda t: float(t["rewards"].sum()))[-capacity:]
        self.capacity, self.next = capacity, 0

    def add(self, traj: dict):
        if len(self.trajs) < self.capacity:
            self.trajs.append(traj)
        else:
            self.trajs[self.next] = traj
            self.next = (self.next + 1) % self.capacity


def flatten_buffer(trajs, state_mean, state_std, rtg_scale, critic_reward):
    """One row per step plus one closing row per trajectory (its last observation, zero action / RTG / reward),
    so that row i + 1 is always the next step of row i. RTGs are relabeled from the achieved rewards."""

    def close(x):
        return np.concatenate([x, np.zeros((1, *x.shape[1:]), x.dtype)]).astype(np.float32)

    lengths = np.array([len(t["rewards"]) for t in trajs])
    terminal = [np.arange(n + 1) == (n - 1 if t["terminated"] else -1) for n, t in zip(lengths, trajs)]
    flat = dict(
        lengths=lengths, offsets=np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]), terminals=np.concatenate(terminal)
    )
    flat["states"] = ((np.concatenate([t["observations"] for t in trajs]) - state_mean) / state_std).astype(np.float32)
    flat["actions"] = np.concatenate([close(t["actions"]) for t in trajs])
    flat["rtg"] = np.concatenate([close(relabel_rtg(t["rewards"], rtg_scale)) for t in trajs])
    flat["rewards"] = np.concatenate([close(critic_reward(t["rewards"])) for t in trajs])
    return flat


def sample_segments(flat, context_len, batch_size, rng, device):
    """Segments as in ODT (trajectory ~ length, uniform start, left padding) and the same segments shifted one
    step forward: the context from which the target DT picks the next action of every token."""
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
    batch["mask"] = torch.as_tensor(mask, device=device)
    return batch


def critic_loss(critic, target_critic, target_model, batch, gamma, policy_noise, noise_clip):
    """Per-token TD3 critic loss on real tokens; next actions from the target DT on the shifted context."""
    with torch.no_grad():
        mean, _ = target_model(batch["next_rtg"], batch["next_states"], batch["next_actions"], batch["mask"])
        noise = (torch.randn_like(mean) * policy_noise).clamp(-noise_clip, noise_clip)
        next_a = (torch.tanh(mean) + noise).clamp(-1.0, 1.0)
        y = td_target(batch["rewards"], batch["terminals"], *target_critic(batch["next_states"], next_a), gamma=gamma)
    q1, q2 = critic(batch["states"], batch["actions"])
    loss = masked_mean((q1 - y) ** 2 + (q2 - y) ** 2, batch["mask"])
    return loss, masked_mean(q1, batch["mask"]).detach()


def actor_loss(model, critic, batch, algo, rl_coef, temperature=None, action_margin=1e-6, censor_bound=None):
    """sup_loss + rl_coef * mean(-Q1(s, a_pred)). odt_td3: MSE of tanh(mean); odt: NLL - temperature * entropy
    (single-sample estimate, padding masked; the checkpoint's margin and censor bound). With rl_coef = 0 the critic
    term is not in the graph at all."""
    mean, log_std = model(batch["rtg"], batch["states"], batch["actions"], batch["mask"])
    mask, info, a_pred = batch["mask"], {}, torch.tanh(mean)
    if algo == "odt":
        dist = squashed_gaussian(mean, log_std)
        nll = masked_mean(-action_log_prob(mean, log_std, batch["actions"], action_margin, censor_bound), mask)
        info["entropy"] = masked_mean(-dist.log_prob(dist.rsample()), mask)
        sup, info["nll"] = nll - temperature.detach() * info["entropy"], nll.detach()
    else:
        sup = masked_mean(((a_pred - batch["actions"]) ** 2).mean(-1), mask)
    loss = sup
    if critic is not None:
        with torch.set_grad_enabled(rl_coef != 0 and torch.is_grad_enabled()):
            rl = masked_mean(-critic(batch["states"], a_pred)[0], mask)
        loss = sup + rl_coef * rl if rl_coef != 0 else sup
        info["rl_loss"] = rl.detach()
    info["sup_loss"] = sup.detach()
    return loss, info


def greedy_action(mean, log_std):
    return torch.tanh(mean)


def noisy_action(mean, log_std, noise: float):
    return (torch.tanh(mean) + noise * torch.randn_like(mean)).clamp(-1.0, 1.0)


def sampled_action(mean, log_std):
    return squashed_gaussian(mean, log_std).sample()


@torch.no_grad()
def rollout(model, envs, seeds, meta, target_return, context_len, act_fn, device, check=None):
    """Episodes in lockstep, one batched forward per step -> trajectories (T+1 observations, `terminated` only on a
    true termination). `act_fn(mean, log_std)` picks the action: tanh(mean), plus noise, or a squashed sample;
    `check(action=...)`, if given, sees the policy's output at every step before."""
    model.eval()
    n, K, scale = len(envs), context_len, meta["rtg_scale"]
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]).astype(np.float32)
    A = envs[0].action_space.shape[0]
    states = torch.zeros(n, K, obs.shape[1], device=device)
    actions, rtg = torch.zeros(n, K, A, device=device), torch.zeros(n, K, 1, device=device)
    mask = torch.zeros(n, K, dtype=torch.bool, device=device)
    target = torch.full((n,), target_return * scale, device=device)
    # copies: `obs` is overwritten in place every step, so a row view would end up holding the last observation
    trajs = [dict(observations=[o.copy()], actions=[], rewards=[], terminated=False) for o in obs]
    alive = np.ones(n, dtype=bool)
    while alive.any():
        states, actions, rtg, mask = (x.roll(-1, dims=1) for x in (states, actions, rtg, mask))
        states[:, -1] = (torch.as_tensor(obs, device=device) - meta["state_mean"]) / meta["state_std"]
        rtg[:, -1, 0], actions[:, -1], mask[:, -1] = target, 0.0, True
        mean, log_std = model(rtg, states, actions, mask)
        if check is not None:
            check(action=mean[:, -1] + log_std[:, -1])  # before sampling: a NaN scale would crash torch.normal
        actions[:, -1] = act_fn(mean[:, -1], log_std[:, -1])
        act_np = actions[:, -1].cpu().numpy()
        for i in np.flatnonzero(alive):
            o, r, term, trunc, _ = envs[i].step(act_np[i])
            obs[i] = o
            t = trajs[i]
            t["observations"].append(obs[i].copy())
            t["actions"].append(act_np[i])
            t["rewards"].append(float(r))
            target[i] -= r * scale
            alive[i], t["terminated"] = not (term or trunc), bool(term)
    model.train()
    arrays = ("observations", "actions", "rewards")
    return [{**t, **{k: np.asarray(t[k], np.float32) for k in arrays}, "return": float(np.sum(t["rewards"]))} for t in trajs]


def warmup_factor(update: int, warmup_updates: int) -> float:
    """The linear lr warm-up factor of the fresh LAMB state."""
    return min(1.0, (update + 1) / max(1, warmup_updates))


class Learner:
    """The DT, its target, the critic pair, their optimisers, log(kappa) (ODT's temperature), the replay buffer, the
    sampling rng and the counters: what the updates change and --resume restores."""

    STATEFUL = ("optimizer", "scheduler", "temperature_opt", "critic", "critic_opt", "target_model", "target_critic")

    def __init__(self, args: Args, model: DecisionTransformer, ckpt: dict, device):
        self.args, self.ckpt, self.device, self.model = args, ckpt, device, model
        self.td3, self.K = args.algo == "odt_td3", args.context_len or ckpt["model_config"]["c_offline"]
        self.rl_coef = args.rl_coef if self.td3 else 0.0
        self.likelihood = dict(action_margin=ckpt.get("action_margin", 1e-6), censor_bound=ckpt.get("censor_bound"))
        self.log_temperature = torch.tensor(float(ckpt["log_temperature"]), device=device, requires_grad=True)
        self.optimizer = Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        warmup = partial(warmup_factor, warmup_updates=args.warmup_updates)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup)
        self.temperature_opt = torch.optim.Adam([self.log_temperature], lr=args.kappa_lr)
        state_dim, act_dim = ckpt["model_config"]["state_dim"], ckpt["model_config"]["act_dim"]
        self.critic = TwinCritic(state_dim, act_dim, hidden=args.critic_hidden, layer_norm=args.critic_layer_norm).to(device)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=args.critic_lr)
        self.target_model = copy.deepcopy(model).requires_grad_(False).eval()  # TD targets without dropout
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.buffer, self.rng = TrajectoryBuffer([], args.replay_size), np.random.default_rng(args.seed)
        self.reward_fn = partial(critic_reward, env_family(args.env_id)[1])
        self.iteration = self.env_steps = self.grad_updates = self.episodes = 0

    def update(self, n_crit: int, n_act: int) -> dict:
        """n_crit critic and n_act actor updates over the same batches (the actor on every n_crit/n_act-th batch)."""
        mean, std = self.ckpt["state_mean"].numpy(), self.ckpt["state_std"].numpy()
        flat = flatten_buffer(self.buffer.trajs, mean, std, rtg_scale=self.ckpt["rtg_scale"], critic_reward=self.reward_fn)
        stats, n = {}, max(n_crit, n_act)
        for i in range(n):
            batch = sample_segments(flat, self.K, self.args.n_batch, self.rng, self.device)
            logs = {}
            if i < n_crit:
                logs["critic_loss"], logs["q_values"] = self.critic_step(batch)
            if (i + 1) * n_act // n > i * n_act // n:
                logs.update(self.actor_step(batch))
            for k, v in logs.items():
                stats.setdefault(k, []).append(v.detach())
        return {k: torch.stack(v).mean().item() for k, v in stats.items()}

    def critic_step(self, batch):
        args = self.args
        noise = dict(policy_noise=args.policy_noise, noise_clip=args.noise_clip)
        loss, q = critic_loss(self.critic, self.target_critic, self.target_model, batch, gamma=args.gamma, **noise)
        self.critic_opt.zero_grad()
        loss.backward()
        self.critic_opt.step()
        polyak_update(self.target_critic, self.critic, args.tau)
        self.grad_updates += 1
        return loss, q

    def actor_step(self, batch):
        args, critic, temperature = self.args, self.critic if self.td3 else None, self.log_temperature.exp()
        weights = dict(rl_coef=self.rl_coef, temperature=temperature, **self.likelihood)
        loss, info = actor_loss(self.model, critic, batch, algo=args.algo, **weights)
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.td3:
            polyak_update(self.target_model, self.model, args.tau)
        else:  # ODT's dual step toward the target entropy
            self.temperature_opt.zero_grad()
            (self.log_temperature.exp() * (info["entropy"] - self.ckpt["target_entropy"]).detach()).backward()
            self.temperature_opt.step()
        self.grad_updates += 1
        return info

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).state_dict() for name in self.STATEFUL}
        state.update(buffer=self.buffer.trajs, buffer_next=self.buffer.next, numpy_rng=self.rng.bit_generator.state)
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        state.update(torch_rng=torch.get_rng_state(), cuda_rng=cuda_rng, iteration=self.iteration, env_steps=self.env_steps)
        return state | {"grad_updates": self.grad_updates, "episodes": self.episodes, "algo": self.args.algo}

    def load_state_dict(self, state: dict):
        """What `state_dict` wrote; log(kappa) comes back with the checkpoint's `log_temperature`."""
        for name in self.STATEFUL:
            getattr(self, name).load_state_dict(state[name])
        self.buffer.trajs, self.buffer.next = state["buffer"], state["buffer_next"]
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.iteration, self.env_steps, self.grad_updates = state["iteration"], state["env_steps"], state["grad_updates"]
        self.episodes = state.get("episodes", self.iteration)  # older run states: one episode per iteration


# ---------------------------------------------------------------- run state
def model_checkpoint(learner: Learner, score: float) -> dict:
    """The finetuned DT in the pretrained checkpoint format (loadable by `load_model`), with the learned temperature."""
    state_dict = {k: v.detach().cpu() for k, v in learner.model.state_dict().items()}
    ckpt = {k: v for k, v in learner.ckpt.items() if k != "finetune"}
    return ckpt | {
        "state_dict": state_dict,
        "log_temperature": float(learner.log_temperature.detach()),
        "eval_normalized_score": score,
    }


def save_state(path: Path, learner: Learner, score: float, **extra):
    """The run state: a DT checkpoint plus a `finetune` dict (learner state and `extra`); atomic (tmp + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model_checkpoint(learner, score) | {"finetune": learner.state_dict() | extra}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # a kill never leaves half a file


def check_finite(it: int, state_path: Path, **values):
    """Stop before a non-finite value can be saved: the last good run state on disk is left as it is."""
    for what, x in values.items():
        if not torch.isfinite(torch.as_tensor(x, dtype=torch.float64)).all():
            kept = f"last good state kept at {state_path}" if state_path.exists() else "no state saved yet"
            raise UserError(f"non-finite {what} at iteration {it}; stopped, {kept}")


def check_stats(it: int, state_path: Path, stats: dict):
    """The mean losses and Q of an update phase."""
    check_finite(it, state_path, loss=[v for k, v in stats.items() if k != "q_values"], Q=stats.get("q_values", 0.0))


# ---------------------------------------------------------------- setup and logging
def seed_everything(args: Args) -> torch.device:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def start_run(args: Args, resumed: Optional[dict], t0: float) -> tuple[str, Path, SummaryWriter]:
    """The run's name (a resumed run keeps its own), its state path (printed once, for --resume) and its writer."""
    run_name = resumed["run_name"] if resumed else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(t0)}"
    state_path = Path(args.save_path or f"{args.runs_dir}/{run_name}/state.pt")
    print(f"run state: {state_path} (continue with --resume {state_path})", flush=True)
    if args.track:
        import wandb

        config = dict(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name)
        wandb.init(**config, sync_tensorboard=True, save_code=True)
    writer = SummaryWriter(f"{args.runs_dir}/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return run_name, state_path, writer


def evaluate(learner: Learner, eval_envs: list, roll: dict, writer, it: int) -> tuple[float, float]:
    """tanh(mean) episodes (dropout off) from `eval_seeds`, at --eval-rtg and --eval-context-len."""
    args, ckpt, roll = learner.args, learner.ckpt, {**roll, "context_len": learner.args.eval_context_len}
    seeds = eval_seeds(args.seed, args.eval_episodes)
    trajs = rollout(learner.model, eval_envs, seeds, target_return=args.eval_rtg, act_fn=greedy_action, **roll)
    rets = np.array([t["return"] for t in trajs])  # summed in float64, as every script
    score = float(np.mean(100.0 * (rets - ckpt["ref_min_score"]) / (ckpt["ref_max_score"] - ckpt["ref_min_score"])))
    writer.add_scalar("charts/eval_return", rets.mean(), it)
    writer.add_scalar("charts/normalized_score", score, it)
    return score, float(rets.mean())


def out_of_budget(args: Args, env_steps: int, t0: float) -> bool:
    return bool(args.total_env_steps and env_steps >= args.total_env_steps) or bool(
        args.max_seconds and time.time() - t0 >= args.max_seconds
    )


def make_envs(args: Args, run_name: str) -> tuple[gym.Env, list]:
    """The training env and eval_episodes evaluation envs (the first one recorded with --capture-video)."""
    env_kw = {} if args.max_episode_steps is None else {"max_episode_steps": args.max_episode_steps}
    eval_envs = [make_env(args.env_id, **env_kw) for _ in range(args.eval_episodes)]
    if args.capture_video:
        eval_envs[0] = gym.wrappers.RecordVideo(make_env(args.env_id, render_mode="rgb_array", **env_kw), f"videos/{run_name}")
    return make_env(args.env_id, **env_kw), eval_envs


# ---------------------------------------------------------------- main
def main(args: Args):
    t_launch = time.time()  # --max-seconds counts from here, loading included
    fix_malloc_mmap_threshold()
    args = resumed_args(args, RUN_CONTROL)
    if args.algo not in ALGOS:
        raise UserError(f"unknown --algo {args.algo!r}; choose one of {', '.join(ALGOS)}")
    args = apply_presets(args)
    if min(args.n_batch, args.eval_episodes, args.replay_size, args.c_online) < 1:
        raise UserError("--n-batch, --eval-episodes, --replay-size and --c-online must be at least 1")
    device = seed_everything(args)

    # Checkpoint (or the run state to resume), the learner and the replay buffer
    ckpt_path = Path(args.resume) if args.resume else ensure_checkpoint(args)
    model, ckpt = load_model(ckpt_path, device, dropout=args.dropout)
    resumed = ckpt.get("finetune") if args.resume else None
    if args.resume and (resumed is None or resumed["algo"] != args.algo or ckpt["env_id"] != args.env_id):
        raise UserError(f"--resume {args.resume} is not a {args.algo} {args.env_id} checkpoint of odt_td3.py")
    if ckpt["env_id"] != args.env_id:
        raise UserError(f"checkpoint {ckpt_path} is for {ckpt['env_id']}, not --env-id {args.env_id}")
    args.eval_rtg = ckpt["eval_rtg"] if args.eval_rtg is None else args.eval_rtg
    run_name, state_path, writer = start_run(args, resumed, t_launch)
    train_env, eval_envs = make_envs(args, run_name)
    meta = dict(rtg_scale=ckpt["rtg_scale"], state_mean=ckpt["state_mean"].to(device), state_std=ckpt["state_std"].to(device))
    roll = dict(meta=meta, context_len=args.c_online, device=device)

    # Iteration 0: the loaded checkpoint, before any update
    learner, history = Learner(args, model, ckpt, device), []
    if resumed is None:
        score, ret = evaluate(learner, eval_envs, roll, writer, it=0)
        history.append(dict(iteration=0, normalized_score=score, eval_return=ret))
        print(f"iteration 0 (pretrained checkpoint {ckpt_path}): return {ret:.1f}, normalized score {score:.1f}")
        if args.num_iterations == 0:
            writer.close()
            return history
        learner.buffer = TrajectoryBuffer(load_offline_trajectories(ckpt), args.replay_size)
    else:
        learner.load_state_dict(resumed)
    state_dim = ckpt["model_config"]["state_dim"]
    data_dim = learner.buffer.trajs[0]["observations"].shape[1] if learner.buffer.trajs else state_dim
    if data_dim != state_dim:
        raise UserError(f"the offline data has state dim {data_dim}, the model {state_dim}")

    # ALGO LOGIC: critic pretraining on the offline data (the DT is frozen: it has already been pretrained)
    if resumed is None and learner.td3 and args.critic_pretrain_updates > 0:
        t0 = time.time()
        stats = learner.update(args.critic_pretrain_updates, 0)
        check_stats(0, state_path, stats)
        took = f"{args.critic_pretrain_updates} updates in {time.time() - t0:.0f}s"
        print(f"critic pretraining: {took}, critic loss {stats['critic_loss']:.3f}, Q {stats['q_values']:.1f}")

    explore = partial(noisy_action, noise=args.explore_noise) if learner.td3 else sampled_action
    n_critic = args.critic_updates if learner.td3 else 0
    start, steps_at_start, it = time.time(), learner.env_steps, learner.iteration
    pbar = tqdm(range(it + 1, args.num_iterations + 1), desc=args.algo, initial=it, total=args.num_iterations)
    for it in pbar:
        # ALGO LOGIC: rollouts with exploration into the FIFO buffer, until the iteration has --min-steps-per-iter steps
        check, iter_steps, returns = partial(check_finite, it, state_path), 0, []
        while not returns or iter_steps < args.min_steps_per_iter:
            learner.episodes += 1
            seed = train_seeds(learner.rng, 1)
            (traj,) = rollout(model, [train_env], seed, target_return=args.g_online, act_fn=explore, check=check, **roll)
            learner.buffer.add(traj)
            iter_steps += len(traj["rewards"])
            returns.append(float(traj["rewards"].sum()))
        learner.env_steps += iter_steps

        # ALGO LOGIC: critic and actor updates on relabeled segments
        t0, u0 = time.time(), learner.grad_updates
        stats = learner.update(n_critic, args.actor_updates)
        updates_per_s = (learner.grad_updates - u0) / (time.time() - t0)
        check_stats(it, state_path, stats)
        learner.iteration = it

        # Evaluation and logging
        score, ret = evaluate(learner, eval_envs, roll, writer, it=it)
        sps = (learner.env_steps - steps_at_start) / (time.time() - start)
        row = dict(episodic_return=float(np.mean(returns)), env_steps=learner.env_steps, grad_updates=learner.grad_updates)
        row.update(SPS=sps, updates_per_s=updates_per_s, learning_rate=learner.scheduler.get_last_lr()[0])
        stats.update(alpha=learner.rl_coef, temperature=learner.log_temperature.exp().item())
        for k, v in [*(("charts/" + k, v) for k, v in row.items()), *(("losses/" + k, v) for k, v in stats.items())]:
            writer.add_scalar(k, v, it)
        history.append(dict(iteration=it, normalized_score=score, eval_return=ret, **row, **stats))
        pbar.set_postfix(score=f"{score:.1f}", ret=f"{row['episodic_return']:.0f}", sup=f"{stats['sup_loss']:.3f}")

        done = it == args.num_iterations or out_of_budget(args, learner.env_steps, t_launch)
        if args.save_every and (done or it % args.save_every == 0):
            save_state(state_path, learner, score, run_name=run_name, args=asdict(args))
        if done:
            break
    writer.close()
    if history:
        score = history[-1]["normalized_score"]
        print(f"finished at iteration {it}: normalized score {score:.1f}, {learner.env_steps} env steps")
    if args.save_model and history:
        torch.save(model_checkpoint(learner, score), f"{args.runs_dir}/{run_name}/{args.exp_name}.pt")
    return history


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
