"""Q-guided GRPO-DT: online finetuning of a Decision Transformer with pure RL gradients and no state resets.

Paper: "Online Finetuning Decision Transformers with Pure RL Gradients" (Luo & Zhu), Section 3.2
(Algorithm 1, Eqs. 2-3, active sampling), Section 3.3.1 (Q-guided GRPO-DT), Appendix B.1, Tables 5-6.
Algorithm 1 with line 6 replaced: instead of resetting the env to a sampled (s_h, g_h) and rolling out
G sub-trajectories, G candidate actions are drawn from the DT there and scored by a TD3 critic,
R(a_i) = Q_phi(s_h, a_i). The scores give Eq. 2 group advantages; Eq. 3 is optimised with a per-action
importance ratio. The critic learns from the online trajectories (twin Q, target nets, smoothing noise).

Use this instead of grpo_dt.py when the environment cannot be put back into an arbitrary state (a real
robot, a simulator without save/restore): this script calls `env.reset()` only to start a new episode
after the previous one ended, never `set_state`. It also spends far fewer env steps per iteration (no
sub-trajectory rollouts). grpo_dt.py needs no critic and gets exact (Monte-Carlo) group scores.

Example (offline, on the shared data):
    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) \
        python grpo_dt_qguided.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --num-iterations 200
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch and the env resets)"""
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
    """if toggled, record videos of the first evaluation episode to `videos/{run_name}`"""
    runs_dir: str = "runs"
    """TensorBoard root; the run logs to `{runs_dir}/{run_name}`"""

    env_id: str = "Hopper-v4"
    """gymnasium id: Hopper/Walker2d/Ant/HalfCheetah-v4/v5, AdroitHandDoor/Hammer/Pen-v1, AntMaze_UMaze-v4/v5"""
    dataset: str = "medium"
    """pretraining dataset (paper short name or Minari id); names the default checkpoint and picks Table 6 values"""
    dataset_path: Optional[str] = None
    """D4RL HDF5 file handed to pretrain_dt.py when the checkpoint has to be pretrained"""
    checkpoint: Optional[str] = None
    """pretrained checkpoint; default `checkpoints/{env_id}__{dataset}__s{seed}.pt`, pretrained if missing"""
    pretrain_extra_args: str = ""
    """extra arguments for the pretrain_dt.py subprocess, e.g. "--num-updates 1000 --embed-dim 128\""""
    num_iterations: int = 200
    """outer iterations of Algorithm 1; 0 only evaluates the checkpoint"""
    total_env_steps: int = 0
    """training env-step budget (0 = none): stop after the iteration that reaches it; eval steps don't count"""
    max_seconds: float = 0
    """wall-clock budget in seconds (0 = none): stop after the iteration that reaches it"""
    eval_episodes: int = 10
    """deterministic evaluation episodes after every iteration, stepped as one batch"""
    torch_threads: int = 0
    """CPU threads of torch (0 = torch's default); 1 is fastest for this small-batch loop on a busy CPU"""
    max_episode_steps: Optional[int] = None
    """episode length cap (a time-limit truncation) for training and evaluation envs; default the env's own"""
    save_every: int = 0
    """write a finetuned checkpoint every this many iterations (and at the end); 0 = never"""
    save_path: Optional[str] = None
    """where --save-every writes; default `{runs_dir}/{run_name}/finetuned.pt`"""
    resume: Optional[str] = None
    """a checkpoint written by --save-every: continue that run up to --num-iterations"""

    # Algorithm 1 and Appendix B.1
    full_trajs_per_iter: Optional[int] = None
    """full trajectories collected per iteration; default 1 (MuJoCo, AntMaze) or 5 (Adroit)"""
    full_buffer_size: int = 32
    """capacity of the FIFO full-trajectory buffer (also the critic's replay)"""
    trajs_per_iter: int = 16
    """trajectories drawn per iteration, in proportion to length"""
    reset_points: int = 4
    """K: points (s_h, g_h) per drawn trajectory, by softmax of the action variance (scored, never reset to)"""
    group_size: int = 8
    """G: candidate actions sampled and scored by the critic at each state"""
    sample_buffer_size: int = 2048
    """capacity of the FIFO buffer of (context, action, old log-prob, advantage)"""
    n_batch: Optional[int] = None
    """policy minibatch; default Table 6 (256 MuJoCo/AntMaze, 512 Adroit)"""
    c_online: Optional[int] = None
    """DT context length in rollouts, updates and evaluation; default Table 6 (1; 5 hammer, umaze-diverse)"""
    g_online: Optional[float] = None
    """RTG conditioning the training rollouts; default Table 6 (e.g. 7200 Hopper)"""
    clip_eps: Optional[float] = None
    """epsilon of the clipped ratio; default Table 6"""
    delta_r: Optional[float] = None
    """drop candidates whose score is within this of the group mean (raw reward units); default Table 6"""
    learning_rate: float = 1e-5
    """LAMB learning rate of the DT (B.1, Q-guided variant)"""
    kappa_initial: float = 1e-2
    """initial entropy dual variable (B.1, Q-guided variant)"""
    kappa_lr: float = 1e-4
    """Adam learning rate of log(kappa) (ODT's temperature learning rate)"""
    kl_coef: float = 1e-3
    """beta, weight of KL(pi || pi_ref) (Table 5)"""
    ref_update_every: int = 4
    """pi_ref is refreshed to the current policy every this many policy updates"""
    updates_per_iter: int = 8
    """policy updates per iteration (each draws n_batch from the sample buffer)"""
    weight_decay: float = 1e-4
    """LAMB weight decay (Table 5)"""
    max_grad_norm: float = 0.5
    """gradient-norm clip of the DT (Table 5)"""

    # TD3 critic (ODT+TD3, Yan et al. 2024)
    critic_updates: Optional[int] = None
    """critic updates per iteration; default 600 MuJoCo, 300 otherwise (ODT+TD3)"""
    critic_warmup_updates: int = 3000
    """critic updates done before the policy starts learning (and before any candidates are scored)"""
    critic_batch_size: int = 256
    """transitions per critic update"""
    critic_hidden: int = 256
    """width of the two hidden layers of each Q network"""
    critic_lr: Optional[float] = None
    """AdamW learning rate; default 1e-3 MuJoCo, 2e-4 otherwise"""
    gamma: Optional[float] = None
    """critic discount; default 0.99 (0.998 AntMaze), as ODT+TD3"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise"""


class UserError(Exception):
    """Bad input: printed as one line, never as a traceback."""


# ---------------------------------------------------------------- envs (copies of pretrain_dt.py's helpers)
MUJOCO_ENVS = {"Hopper": "hopper", "Walker2d": "walker2d", "Ant": "ant", "HalfCheetah": "halfcheetah"}
ADROIT_ENVS = {"AdroitHandDoor": "door", "AdroitHandHammer": "hammer", "AdroitHandPen": "pen"}
SUPPORTED = "MuJoCo Hopper/Walker2d/Ant/HalfCheetah-v4|v5, Adroit AdroitHandDoor/Hammer/Pen-v1, AntMaze_UMaze-v4|v5"
# Table 6 per env key: n_batch, c_online, g_online, eps, delta_r. HalfCheetah is not in Table 6: ODT's online
# RTG 12000 with the other MuJoCo values.
TABLE6 = {"hopper": (256, 1, 7200, 0.2, 2.0), "walker2d": (256, 1, 10000, 0.3, 2.0),
          "ant": (256, 1, 12000, 0.3, 2.0), "halfcheetah": (256, 1, 12000, 0.3, 2.0),
          "door": (512, 1, 3000, 0.3, 0.4), "pen": (512, 1, 6000, 0.3, 0.0), "hammer": (512, 5, 4000, 0.3, 0.8),
          "antmaze": (256, 1, 2, 0.2, 0.0)}
TABLE6_BY_DATASET = {("door", "cloned"): {"delta_r": 0.5}, ("hammer", "cloned"): {"delta_r": 0.0},
                     ("antmaze", "diverse"): {"c_online": 5}}
# Critic rewards as ODT+TD3: Adroit scaled down, MuJoCo raw, AntMaze shifted by -1 per step.
REWARD_SCALE = {"door": 1e-2, "pen": 1e-2, "hammer": 1e-3}


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


def default_checkpoint_path(env_id: str, dataset: str, seed: int) -> Path:
    """The path every finetuning script looks at first: checkpoints/{env_id}__{dataset with / -> -}__s{seed}.pt"""
    return Path("checkpoints") / f"{env_id}__{dataset.replace('/', '-')}__s{seed}.pt"


def resolve_defaults(args: Args) -> Args:
    """Fill every None with the paper's value for this env family / dataset (Table 6, B.1, ODT+TD3)."""
    family, key = env_family(args.env_id)
    table = dict(zip(("n_batch", "c_online", "g_online", "clip_eps", "delta_r"), TABLE6[key]))
    for (k, word), override in TABLE6_BY_DATASET.items():
        if k == key and word in args.dataset:
            table.update(override)
    table.update(full_trajs_per_iter=5 if family == "adroit" else 1,
                 critic_updates=600 if family == "mujoco" else 300,
                 critic_lr=1e-3 if family == "mujoco" else 2e-4, gamma=0.998 if family == "antmaze" else 0.99)
    filled = copy.copy(args)
    for name, value in table.items():
        if getattr(filled, name) is None:
            setattr(filled, name, value)
    return filled


# ---------------------------------------------------------------- models (Block, DT, squashed_gaussian, Lamb: copies)
class Block(nn.Module):
    """Pre-LayerNorm transformer block; attention through `scaled_dot_product_attention`."""

    def __init__(self, embed_dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim),
                                 nn.Dropout(dropout))
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, attn_mask):
        B, L, E = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, E // self.n_heads).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, E)))
        return x + self.mlp(self.ln2(x))


class DecisionTransformer(nn.Module):
    """Tokens (RTG_t, s_t, a_t) per step, no positional embedding; the s_t output parameterises a pre-tanh Gaussian."""

    def __init__(self, state_dim, act_dim, embed_dim=512, n_layers=4, n_heads=4, dropout=0.1,
                 log_std_min=-5.0, log_std_max=2.0):
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
    return Independent(TransformedDistribution(base, [TanhTransform(cache_size=1)], validate_args=False), 1,
                       validate_args=False)


def action_log_prob(mean, log_std, actions, margin: float):
    """log pi(a) of given actions under the squashed Gaussian, actions clamped to +-(1 - margin) so atanh is finite.

    The one definition of an action's log-prob: pretraining's NLL uses it, and so does every finetuning script that
    scores actions it did not sample from a known pre-tanh value (with the checkpoint's `action_margin`)."""
    return squashed_gaussian(mean, log_std).log_prob(actions.clamp(-1 + margin, 1 - margin))


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


class TwinCritic(nn.Module):
    """TD3's twin Q: (s, a) -> 256 -> 256 -> 1 with ReLU (ODT+TD3); non-affine LayerNorm outside MuJoCo."""

    def __init__(self, state_dim, act_dim, hidden=256, layer_norm=False):
        super().__init__()

        def q_net():
            norm = (lambda: nn.LayerNorm(hidden, elementwise_affine=False)) if layer_norm else nn.Identity
            return nn.Sequential(nn.Linear(state_dim + act_dim, hidden), norm(), nn.ReLU(),
                                 nn.Linear(hidden, hidden), norm(), nn.ReLU(), nn.Linear(hidden, 1))

        self.q1, self.q2 = q_net(), q_net()

    def forward(self, states, actions):
        x = torch.cat([states, actions], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def load_model(path, device="cpu"):
    """The script's loader: (DT with dropout off, checkpoint dict)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = {k: v for k, v in ckpt["model_config"].items() if k not in ("activation", "c_offline")}
    model = DecisionTransformer(**{**cfg, "dropout": 0.0}).to(device)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


# ---------------------------------------------------------------- algorithm pieces
EPS_ACTION = 1e-6  # actions are kept inside (-1, 1) so atanh in log_prob stays finite


def policy_head(model, ctx):
    """The DT's pre-tanh mean and log-std for the last context slot."""
    mean, log_std = model(*ctx)
    return mean[:, -1], log_std[:, -1]


def group_advantages(scores, delta_r):
    """Eq. 2 per group (row of `scores`, (N, G)) and the Delta_r filter: keep |score - group mean| > Delta_r."""
    centred = scores - scores.mean(dim=1, keepdim=True)
    adv = centred / (scores.std(dim=1, correction=0, keepdim=True) + 1e-8)
    return adv, centred.abs() > delta_r


@torch.no_grad()
def q_guided_scores(model, critic, ctx, group_size, reward_scale, action_margin=1e-6):
    """Section 3.3.1: G actions per context from pi_theta(.|s_h, g_h), scored R(a_i) = min(Q1, Q2)(s_h, a_i).

    Scores are divided by the critic's reward scale so Delta_r is in raw reward units, as in grpo_dt.py.
    Returns actions (N, G, A), their log-probs under pi_theta (N, G) and the scores (N, G).
    """
    mean, log_std = policy_head(model, ctx)
    actions = squashed_gaussian(mean, log_std).sample((group_size,)).clamp(-1 + EPS_ACTION, 1 - EPS_ACTION)  # (G, N, A)
    log_probs = action_log_prob(mean, log_std, actions, action_margin)
    states = ctx[1][:, -1].expand(group_size, -1, -1)  # s_h, the newest state of each context
    scores = torch.min(*critic(states, actions)) / reward_scale
    return actions.transpose(0, 1), log_probs.T, scores.T


def grpo_loss(log_probs, old_log_probs, advantages, clip_eps):
    """Eq. 3 (without the KL) with a per-action ratio: each hypothetical sub-trajectory is the one action."""
    ratio = (log_probs - old_log_probs).exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    clipfrac = ((ratio - 1).abs() > clip_eps).float().mean()
    return -surrogate.mean(), ratio, clipfrac


def kl_to_ref(base, ref_base):
    """KL(pi || pi_ref) of the pre-tanh Gaussians (closed form; the tanh is shared so it cancels), summed over dims."""
    return kl_divergence(base, ref_base).sum(-1).mean()


def policy_objective(model, ref_model, batch, clip_eps, action_margin=1e-6):
    """The terms of Eq. 3 on a minibatch of the sample buffer: clipped per-action surrogate, KL to pi_ref, and
    ODT's single-sample entropy estimate (the tanh-Gaussian has no closed form)."""
    ctx = (batch["rtg"], batch["states"], batch["ctx_actions"], batch["mask"])
    mean, log_std = policy_head(model, ctx)
    pg_loss, ratio, clipfrac = grpo_loss(action_log_prob(mean, log_std, batch["action"], action_margin),
                                         batch["old_log_prob"], batch["advantage"], clip_eps)
    with torch.no_grad():
        ref_mean, ref_log_std = policy_head(ref_model, ctx)
    dist = squashed_gaussian(mean, log_std)
    entropy = -dist.log_prob(dist.rsample()).mean()
    kl = kl_to_ref(Normal(mean, log_std.exp()), Normal(ref_mean, ref_log_std.exp()))
    return dict(pg_loss=pg_loss, ratio=ratio, clipfrac=clipfrac, kl=kl, entropy=entropy)


def td_target(rewards, terminated, next_q1, next_q2, gamma):
    """TD3 target r + gamma (1 - terminated) min(Q1', Q2'): termination cuts the bootstrap, truncation keeps it."""
    return rewards + gamma * (1.0 - terminated.float()) * torch.min(next_q1, next_q2)


def reset_probs(action_var):
    """Active sampling (Sec. 3.2): softmax over a trajectory's steps of the mean action variance sigma_h^2.

    The name follows Algorithm 1; here the sampled points are scored by the critic, never reset to.
    """
    z = np.asarray(action_var, np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()


def contexts(traj, hs, c):
    """DT inputs whose newest slot is step h (one per entry of hs): the last c tokens, left-padded, with the RTGs
    of the rollout (no hindsight relabeling) and the action slot at h zeroed, exactly as the rollout fed them."""
    offs = hs[:, None] - (c - 1) + np.arange(c)[None]
    mask = offs >= 0
    idx = np.where(mask, offs, 0)
    rtg = np.where(mask, traj["rtg"][idx], 0.0)[..., None]
    states = np.where(mask[..., None], traj["states"][idx], 0.0)
    actions = np.where((mask & (offs < hs[:, None]))[..., None], traj["actions"][idx], 0.0)
    return rtg.astype(np.float32), states.astype(np.float32), actions.astype(np.float32), mask


def sample_points(traj_buffer, n_trajectories, k, c, rng):
    """Algorithm 1 lines 3-5: trajectories drawn in proportion to length, then K steps of each drawn by active
    sampling; returns the DT contexts of those (s_h, g_h) as numpy arrays (rtg, states, actions, mask)."""
    lengths = np.array([len(t["rewards"]) for t in traj_buffer])
    picks = rng.choice(len(traj_buffer), size=n_trajectories, p=lengths / lengths.sum())
    ctx = [contexts(traj_buffer[j], rng.choice(lengths[j], size=k, p=reset_probs(traj_buffer[j]["var"]),
                                               replace=lengths[j] < k), c) for j in picks]
    return [np.concatenate(x) for x in zip(*ctx)]


def to_tensors(arrays, device):
    return tuple(torch.as_tensor(x, device=device) for x in arrays)


class FifoBuffer:
    """Fixed-capacity FIFO of equally-long tensors (the Q-guided sample buffer, T_sub of Algorithm 1)."""

    def __init__(self, capacity):
        self.capacity, self.data = capacity, {}

    def __len__(self):
        return len(next(iter(self.data.values()))) if self.data else 0

    def push(self, **items):
        self.data = {k: torch.cat([self.data[k], v])[-self.capacity:] if self.data else v[-self.capacity:]
                     for k, v in items.items()}

    def sample(self, n, rng):
        idx = torch.as_tensor(rng.choice(len(self), size=n, replace=n > len(self)))
        return {k: v[idx] for k, v in self.data.items()}


@torch.no_grad()
def run_episodes(model, envs, seeds, target_rtg, meta, device, deterministic):
    """One episode per env, stepped in lockstep with one batched forward per step; finished envs are masked.

    Returns trajectories: normalised states and scaled RTG tokens (T+1 rows: the last is the final observation),
    actions (T+1 rows, last zero), rewards, the mean pre-tanh action variance per step, terminated, return.
    Only `env.reset(seed)` starts an episode: nothing here (or anywhere in this script) sets a state.
    """
    n, c, rtg_scale = len(envs), meta["context_len"], meta["rtg_scale"]
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])
    S, A = obs.shape[1], envs[0].action_space.shape[0]
    rtg_now = np.full(n, target_rtg * rtg_scale, dtype=np.float32)
    states, actions = torch.zeros(n, c, S, device=device), torch.zeros(n, c, A, device=device)
    rtg, mask = torch.zeros(n, c, 1, device=device), torch.zeros(n, c, dtype=torch.bool, device=device)
    rec = [{"states": [], "rtg": [], "actions": [], "rewards": [], "var": []} for _ in range(n)]
    trajs, alive = [None] * n, np.ones(n, dtype=bool)
    while alive.any():
        s_norm = ((obs - meta["state_mean"]) / meta["state_std"]).astype(np.float32)
        # Shift the context one step left and write the newest state and RTG in the last slot.
        states, actions, rtg, mask = (x.roll(-1, dims=1) for x in (states, actions, rtg, mask))
        states[:, -1], rtg[:, -1, 0] = torch.as_tensor(s_norm, device=device), torch.as_tensor(rtg_now, device=device)
        actions[:, -1], mask[:, -1] = 0.0, True
        mean, log_std = model(rtg, states, actions, mask)
        mean, log_std = mean[:, -1], log_std[:, -1]
        act = torch.tanh(mean) if deterministic else squashed_gaussian(mean, log_std).sample()
        actions[:, -1] = act = act.clamp(-1 + EPS_ACTION, 1 - EPS_ACTION)
        act_np, var = act.cpu().numpy(), (2 * log_std).exp().mean(-1).cpu().numpy()
        for i in np.flatnonzero(alive):
            o, r, term, trunc, _ = envs[i].step(act_np[i])
            for k, v in (("states", s_norm[i]), ("rtg", rtg_now[i]), ("actions", act_np[i]), ("rewards", r),
                         ("var", var[i])):
                rec[i][k].append(v)
            obs[i] = o
            rtg_now[i] -= np.float32(r * rtg_scale)
            if term or trunc:
                alive[i] = False
                final = ((o - meta["state_mean"]) / meta["state_std"]).astype(np.float32)
                r_i = rec[i]
                trajs[i] = {"states": np.stack(r_i["states"] + [final]), "rtg": np.array(r_i["rtg"] + [rtg_now[i]]),
                            "actions": np.stack(r_i["actions"] + [np.zeros(A, np.float32)]),
                            "rewards": np.array(r_i["rewards"], np.float32), "var": np.array(r_i["var"]),
                            "terminated": bool(term), "return": float(np.sum(r_i["rewards"]))}
    return trajs


@torch.no_grad()
def critic_dataset(buffer, model, c, reward_scale, reward_shift, device, chunk=4096):
    """All transitions of the trajectory buffer for TD3, with the target action for s_{t+1} precomputed once per
    iteration: tanh(mean) of the current DT on the shifted next context (a target actor hard-updated per iteration;
    the DT moves slowly at lr 1e-5, so this replaces ODT+TD3's Polyak copy of the whole transformer)."""
    parts = {k: [] for k in ("s", "a", "r", "s2", "term", "ctx2")}
    for traj in buffer:
        T = len(traj["rewards"])
        parts["s"].append(traj["states"][:T])
        parts["a"].append(traj["actions"][:T])
        parts["r"].append((traj["rewards"] - reward_shift) * reward_scale)
        parts["s2"].append(traj["states"][1:])
        parts["term"].append(np.arange(T) == T - 1 if traj["terminated"] else np.zeros(T, bool))
        parts["ctx2"].append(contexts(traj, np.arange(1, T + 1), c))
    ctx2 = [np.concatenate(x) for x in zip(*parts.pop("ctx2"))]
    data = {k: torch.as_tensor(np.concatenate(v), device=device) for k, v in parts.items()}
    next_actions = [torch.tanh(policy_head(model, to_tensors([x[i:i + chunk] for x in ctx2], device))[0])
                    for i in range(0, len(ctx2[0]), chunk)]
    data["a2"] = torch.cat(next_actions)
    return data


def critic_update(critic, critic_target, optimizer, batch, gamma, policy_noise, noise_clip, tau):
    """One TD3 critic step with target policy smoothing, then a Polyak step of the target critics."""
    with torch.no_grad():
        noise = (torch.randn_like(batch["a2"]) * policy_noise).clamp(-noise_clip, noise_clip)
        next_q1, next_q2 = critic_target(batch["s2"], (batch["a2"] + noise).clamp(-1, 1))
        target = td_target(batch["r"], batch["term"], next_q1, next_q2, gamma)
    q1, q2 = critic(batch["s"], batch["a"])
    loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for p, tp in zip(critic.parameters(), critic_target.parameters()):
            tp.lerp_(p, tau)
    return loss.item(), q1.mean().item()


def save_checkpoint(path: Path, payload: dict):
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def pretrained_checkpoint(args: Args) -> Path:
    """--checkpoint, or the default path; pretrain it with pretrain_dt.py in a subprocess when it is missing."""
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise UserError(f"--checkpoint {args.checkpoint!r} is not a file")
        return Path(args.checkpoint)
    path = default_checkpoint_path(args.env_id, args.dataset, args.seed)
    if not path.is_file():
        print(f"checkpoint {path} not found: pretraining it with pretrain_dt.py")
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "pretrain_dt.py"), "--env-id", args.env_id,
               "--dataset", args.dataset, "--seed", str(args.seed), "--checkpoint", str(path)]
        cmd += (["--dataset-path", args.dataset_path] if args.dataset_path else []) + shlex.split(args.pretrain_extra_args)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            raise UserError(f"pretraining failed (exit {rc}): {shlex.join(cmd)}")
    return path


def fix_malloc_mmap_threshold():
    """Stop glibc's RSS creep on CPU: after large frees it raises its mmap threshold, and each update's
    activations then fragment the heap (measured: 12 updates of the 4x512 DT, 5.2 GB peak; fixed, 2.9 GB)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        except OSError:  # not glibc
            pass


# ---------------------------------------------------------------- main
def main(args: Args):
    fix_malloc_mmap_threshold()
    family, key = env_family(args.env_id)
    args = resolve_defaults(args)
    if args.group_size < 2 or min(args.eval_episodes, args.full_trajs_per_iter, args.c_online) < 1:
        raise UserError("need --group-size >= 2 (a group of one has no advantage) and --eval-episodes, "
                        "--full-trajs-per-iter, --c-online >= 1")
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(args.seed)

    # Start: the pretrained DT (or the run to resume), dims checked, dropout off
    if args.resume and not Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume!r} is not a file")
    model, ckpt = load_model(args.resume or pretrained_checkpoint(args), device)
    if args.resume and "finetune" not in ckpt:
        raise UserError(f"--resume {args.resume!r} is a pretrained checkpoint, not one written by --save-every")
    probe = make_env(args.env_id)
    dims, cfg = (probe.observation_space.shape[0], probe.action_space.shape[0]), ckpt["model_config"]
    if (cfg["state_dim"], cfg["act_dim"]) != dims:
        raise UserError(f"checkpoint {ckpt['env_id']} has state/action dims ({cfg['state_dim']}, {cfg['act_dim']}) "
                        f"but {args.env_id} has {dims}; pass a checkpoint pretrained for {args.env_id}")
    state_dim, act_dim = dims
    meta = dict(context_len=args.c_online, rtg_scale=ckpt["rtg_scale"], state_mean=ckpt["state_mean"].numpy(),
                state_std=ckpt["state_std"].numpy())
    reward_scale, reward_shift = REWARD_SCALE.get(key, 1.0), 1.0 if family == "antmaze" else 0.0
    ref_min, ref_max = ckpt["ref_min_score"], ckpt["ref_max_score"]

    ref_model = copy.deepcopy(model).requires_grad_(False)
    critic = TwinCritic(state_dim, act_dim, args.critic_hidden, layer_norm=family != "mujoco").to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    policy_opt = Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr)
    log_kappa = torch.tensor(float(np.log(args.kappa_initial)), device=device, requires_grad=True)
    kappa_opt = torch.optim.Adam([log_kappa], lr=args.kappa_lr)
    target_entropy = -float(act_dim)
    traj_buffer = deque(maxlen=args.full_buffer_size)
    sample_buffer = FifoBuffer(args.sample_buffer_size)
    state = dict(iteration=0, env_steps=0, grad_updates=0, critic_updates=0, policy_updates=0)
    stateful = dict(critic=critic, critic_target=critic_target, ref_model=ref_model, policy_opt=policy_opt,
                    critic_opt=critic_opt, kappa_opt=kappa_opt)
    if args.resume:
        ft = ckpt["finetune"]
        for k, obj in stateful.items():
            obj.load_state_dict(ft[k])
        with torch.no_grad():
            log_kappa.copy_(ft["log_kappa"])
        traj_buffer.extend(ft["traj_buffer"])
        sample_buffer.data = {k: v.to(device) for k, v in ft["sample_buffer"].items()}
        state.update(ft["state"])
        rng.bit_generator.state = ft["numpy_rng"]
        torch.set_rng_state(ft["torch_rng"])

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name,
                   sync_tensorboard=True, save_code=True)
    writer = SummaryWriter(f"{args.runs_dir}/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    env_kwargs = {"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}
    train_envs = [make_env(args.env_id, **env_kwargs) for _ in range(args.full_trajs_per_iter)]
    eval_envs = [make_env(args.env_id, **env_kwargs, **({"render_mode": "rgb_array"} if i == 0 and args.capture_video
                                                        else {})) for i in range(args.eval_episodes)]
    if args.capture_video:
        eval_envs[0] = gym.wrappers.RecordVideo(eval_envs[0], f"videos/{run_name}")
    save_path = Path(args.save_path or f"{args.runs_dir}/{run_name}/finetuned.pt")

    def evaluate(iteration):
        trajs = run_episodes(model, eval_envs, args.seed + 10_000 + np.arange(len(eval_envs)), ckpt["eval_rtg"], meta,
                             device, deterministic=True)
        rets = np.array([t["return"] for t in trajs])
        score = float(np.mean(100.0 * (rets - ref_min) / (ref_max - ref_min)))
        writer.add_scalar("charts/normalized_score", score, iteration)
        writer.add_scalar("charts/eval_return", rets.mean(), iteration)
        return score

    def finetuned_payload(score):
        return {**ckpt, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "eval_normalized_score": score,
                "finetune": {"state": dict(state), "args": asdict(args), "log_kappa": log_kappa.detach().cpu(),
                             **{k: obj.state_dict() for k, obj in stateful.items()},
                             "traj_buffer": list(traj_buffer), "sample_buffer": sample_buffer.data,
                             "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}}

    # Iteration 0: the loaded checkpoint, before any update
    score = ckpt["eval_normalized_score"]
    if not args.resume:
        score = evaluate(0)
        for name in ("env_steps", "grad_updates"):
            writer.add_scalar(f"charts/{name}", 0, 0)
        tqdm.write(f"iteration 0: normalized score {score:.1f} (loaded checkpoint)")
    start_time, start_steps = time.time(), state["env_steps"]
    pbar = tqdm(range(state["iteration"] + 1, args.num_iterations + 1), desc="grpo-dt-qguided", mininterval=2.0)
    for iteration in pbar:
        # Line 2: full trajectories conditioned on g_online, sampled actions, no hindsight relabeling; FIFO buffer
        trajs = run_episodes(model, train_envs, rng.integers(2**31, size=len(train_envs)), args.g_online, meta, device,
                             deterministic=False)
        traj_buffer.extend(trajs)
        state["env_steps"] += sum(len(t["rewards"]) for t in trajs)
        writer.add_scalar("charts/episodic_return", np.mean([t["return"] for t in trajs]), iteration)

        # Q_phi: TD3 on the online transitions (twin critics, target nets, smoothing noise, truncation bootstraps)
        data = critic_dataset(traj_buffer, model, args.c_online, reward_scale, reward_shift, device)
        critic_stats = []
        for _ in range(args.critic_updates):
            idx = torch.as_tensor(rng.integers(len(data["r"]), size=args.critic_batch_size), device=device)
            critic_stats.append(critic_update(critic, critic_target, critic_opt, {k: v[idx] for k, v in data.items()},
                                              args.gamma, args.policy_noise, args.noise_clip, args.tau))
        state["critic_updates"] += args.critic_updates
        state["grad_updates"] += args.critic_updates
        if critic_stats:
            writer.add_scalar("losses/critic_loss", np.mean([s[0] for s in critic_stats]), iteration)
            writer.add_scalar("losses/q_values", np.mean([s[1] for s in critic_stats]), iteration)

        if state["critic_updates"] >= args.critic_warmup_updates:
            # Lines 3-8: trajectories by length, K points by action variance, G critic-scored actions each
            ctx = to_tensors(sample_points(traj_buffer, args.trajs_per_iter, args.reset_points,
                                           args.c_online, rng), device)
            actions, old_log_probs, scores = q_guided_scores(model, critic, ctx, args.group_size, reward_scale,
                                                             action_margin=ckpt.get("action_margin", 1e-6))
            adv, keep = group_advantages(scores, args.delta_r)
            rows, cols = keep.nonzero(as_tuple=True)
            sample_buffer.push(rtg=ctx[0][rows], states=ctx[1][rows], ctx_actions=ctx[2][rows], mask=ctx[3][rows],
                               action=actions[rows, cols], old_log_prob=old_log_probs[rows, cols],
                               advantage=adv[rows, cols])
            writer.add_scalar("losses/group_score_std", scores.std(dim=1, correction=0).mean().item(), iteration)
            writer.add_scalar("losses/kept_fraction", keep.float().mean().item(), iteration)

        # Line 9: Eq. 3 with per-action ratios, - beta KL(pi || pi_ref), + kappa H with kappa a dual variable
        stats = []
        for _ in range(args.updates_per_iter if len(sample_buffer) else 0):
            terms = policy_objective(model, ref_model, sample_buffer.sample(args.n_batch, rng), args.clip_eps,
                                     action_margin=ckpt.get("action_margin", 1e-6))
            pg_loss, ratio, clipfrac, kl, entropy = (terms[k] for k in ("pg_loss", "ratio", "clipfrac", "kl", "entropy"))
            kappa = log_kappa.exp()
            loss = pg_loss + args.kl_coef * kl - kappa.detach() * entropy
            policy_opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            policy_opt.step()
            kappa_loss = kappa * (entropy - target_entropy).detach()
            kappa_opt.zero_grad()
            kappa_loss.backward()
            kappa_opt.step()
            state["policy_updates"] += 1
            state["grad_updates"] += 1
            if state["policy_updates"] % args.ref_update_every == 0:
                ref_model.load_state_dict(model.state_dict())
            stats.append((pg_loss.item(), ratio.mean().item(), clipfrac.item(), kl.item(), entropy.item(),
                          kappa.item()))
        for name, values in zip(("policy_loss", "ratio_mean", "clipfrac", "kl", "entropy", "kappa"), zip(*stats)):
            writer.add_scalar(f"losses/{name}", np.mean(values), iteration)

        # Evaluate, log, save, budgets
        state["iteration"] = iteration
        score = evaluate(iteration)
        sps = int((state["env_steps"] - start_steps) / max(time.time() - start_time, 1e-9))
        for name in ("env_steps", "grad_updates"):
            writer.add_scalar(f"charts/{name}", state[name], iteration)
        writer.add_scalar("charts/SPS", sps, iteration)
        pbar.set_postfix(score=f"{score:.1f}", steps=state["env_steps"], buf=len(sample_buffer))
        out_of_budget = ((args.total_env_steps and state["env_steps"] >= args.total_env_steps)
                         or (args.max_seconds and time.time() - start_time >= args.max_seconds))
        last = iteration == args.num_iterations or out_of_budget
        if args.save_every and (iteration % args.save_every == 0 or last):
            save_checkpoint(save_path, finetuned_payload(score))
        if out_of_budget:
            tqdm.write(f"budget reached after iteration {iteration} ({state['env_steps']} env steps)")
            break
    writer.close()
    return score


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
