"""PPO-DT: online finetuning of a pretrained Decision Transformer with PPO, GAE and no hindsight relabeling.

Paper: "Online Finetuning Decision Transformers with Pure RL Gradients" (Luo & Zhu), Section 3.3.2,
Appendix B.1-B.2, Algorithm 2, Eqs. 4-6, Tables 5 and 7. Each iteration rolls out K_PPO trajectories
conditioned on g_online (one batched policy forward per step), keeps their RTG tokens and log-probs
exactly as used at rollout, computes GAE per step with an MLP value network, and maximises the
token-level clipped PPO objective minus beta x KL to a slowly refreshed reference policy plus
kappa x entropy (kappa a dual variable toward -dim(A)) on sub-trajectories sampled from a FIFO buffer.

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
    """seed of the experiment (python, numpy, torch, env resets; also picks the default checkpoint)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` and deterministic torch algorithms"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    torch_threads: int = 0
    """CPU threads for torch (0: torch's default); 1 is much faster for small models on a busy CPU"""
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
    """pretraining dataset (short name or Minari id); picks the default checkpoint and the Table 7 row by its
    last part without version (local/hopper/medium-v0 -> medium); names without a row (e.g. expert) get
    the MuJoCo "medium", Adroit "human" or AntMaze "umaze" row"""
    dataset_path: Optional[str] = None
    """D4RL HDF5 file handed to pretrain_dt.py when the checkpoint has to be made"""
    checkpoint: Optional[str] = None
    """pretrained checkpoint; default `checkpoints/{env_id}__{dataset}__s{seed}.pt`, pretrained if missing"""
    pretrain_extra_args: str = ""
    """extra pretrain_dt.py flags (one shell-quoted string) used when the checkpoint has to be made"""

    num_iterations: int = 100
    """outer iterations of Algorithm 2 (0: evaluate the checkpoint and exit)"""
    total_env_steps: int = 0
    """stop after the iteration at which training env steps reach this (0: no budget; eval steps do not count)"""
    max_seconds: float = 0
    """stop after the iteration at which wall-clock seconds reach this (0: no budget)"""
    eval_episodes: int = 10
    """deterministic tanh(mean) evaluation episodes per iteration, stepped as one batch"""
    save_every: int = 0
    """write the finetuned checkpoint every this many iterations (and at the end); 0: never"""
    save_path: Optional[str] = None
    """where --save-every writes; default `checkpoints/{run_name}.pt`"""
    resume: Optional[str] = None
    """a checkpoint written by --save-every: continue that run from its next iteration"""
    max_episode_steps: Optional[int] = None
    """cap on episode length (a time-limit truncation, bootstrapped); default the env's own limit"""

    # Table 7 (None: the --dataset row; HalfCheetah, absent from Table 7, uses MuJoCo medium with g_online 12000)
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
    lr_policy: Optional[float] = None
    """LAMB learning rate of the DT (Table 7: 5e-5 MuJoCo/AntMaze, 3e-5 Adroit)"""
    lr_value: Optional[float] = None
    """AdamW learning rate of the value MLP (Table 7: 1e-3 MuJoCo/AntMaze, 2e-4 Adroit)"""
    kappa_initial: Optional[float] = None
    """initial entropy dual variable (Table 7)"""

    updates_per_iteration: int = 8
    """gradient updates per iteration, each on n_batch sub-trajectories (Sec. 4.2: "8 x 256")"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon (Table 7)"""
    gamma: float = 0.99
    """GAE discount (Table 7)"""
    gae_lambda: float = 0.95
    """GAE lambda (Table 7)"""
    beta: float = 1e-3
    """coefficient of KL(pi || pi_ref) (Table 5)"""
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


class UserError(Exception):
    """Bad input: printed as one line, never as a traceback."""


# ---------------------------------------------------------------- envs
MUJOCO_ENVS = {"Hopper": "hopper", "Walker2d": "walker2d", "Ant": "ant", "HalfCheetah": "halfcheetah"}
ADROIT_ENVS = {"AdroitHandDoor": "door", "AdroitHandHammer": "hammer", "AdroitHandPen": "pen"}
SUPPORTED = "MuJoCo Hopper/Walker2d/Ant/HalfCheetah-v4|v5, Adroit AdroitHandDoor/Hammer/Pen-v1, AntMaze_UMaze-v4|v5"
# Table 7: (n_batch, c_online, g_online, K_PPO, lr_policy, lr_value, kappa_initial) per (env key, dataset kind).
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


def table7_preset(env_id: str, dataset: str) -> dict:
    """The Table 7 row for env + dataset; a dataset name without its own row gets the family's default row."""
    family, key = env_family(env_id)
    kind = dataset.rstrip("/").rsplit("/", 1)[-1].split("-v")[0]  # "mujoco/hopper/random-v0" -> "random"
    # Rows only differ for random (MuJoCo) and umaze-diverse: medium-replay, cloned, expert... share the default row.
    row = TABLE7.get((key, kind)) or TABLE7[(key, FAMILY_DEFAULT_KIND[family])]
    return dict(zip(("n_batch", "c_online", "g_online", "k_ppo", "lr_policy", "lr_value", "kappa_initial"), row))


# ---------------------------------------------------------------- model (a copy of pretrain_dt.py's)
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
    """(RTG, state, action) tokens, no positional embedding (ODT); the state token predicts the action."""

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


class ValueNet(nn.Module):
    """V(s): 2 hidden SiLU layers (Table 5), optional LayerNorm; outputs scale x MLP so the MLP works at O(1)."""

    def __init__(self, state_dim: int, hidden: int, layer_norm: bool, scale: float):
        super().__init__()
        norm = (lambda: nn.LayerNorm(hidden)) if layer_norm else nn.Identity
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), norm(), nn.SiLU(),
                                 nn.Linear(hidden, hidden), norm(), nn.SiLU(), nn.Linear(hidden, 1))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, states):
        return self.scale * self.net(states).squeeze(-1)


def load_model(path, device="cpu"):
    """(model with dropout off, checkpoint dict) from a pretrain_dt.py (or finetuned) checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("format_version") != 1:
        raise UserError(f"{path} is not a format-1 pretrain_dt.py checkpoint")
    cfg = {k: v for k, v in ckpt["model_config"].items() if k not in ("activation", "c_offline")}
    model = DecisionTransformer(**{**cfg, "dropout": 0.0}).to(device)  # Table 5: dropout off in finetuning
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt


def ensure_checkpoint(args: Args) -> Path:
    """The checkpoint path; runs pretrain_dt.py as a subprocess first when nothing is there."""
    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint_path(args.env_id, args.dataset, args.seed)
    if path.exists():
        return path
    print(f"no checkpoint at {path}; pretraining one with pretrain_dt.py")
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "pretrain_dt.py"), "--env-id", args.env_id,
           "--dataset", args.dataset, "--seed", str(args.seed), "--checkpoint", str(path)]
    cmd += ["--dataset-path", args.dataset_path] if args.dataset_path else []
    cmd += shlex.split(args.pretrain_extra_args)
    if subprocess.run(cmd).returncode != 0 or not path.exists():
        raise UserError(f"pretraining failed: {shlex.join(cmd)}")
    return path


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
def rollout(model, envs, seeds, target_rtg, rtg_scale, context_len, state_mean, state_std, deterministic, device,
            action_margin=1e-6):
    """One episode per env, all stepped in lockstep with ONE batched forward per step over the live members.

    Returns per-episode dicts of the exact tokens the policy saw: normalised states, RTG tokens (scaled),
    executed actions, their log-probs, rewards, whether it terminated, and the normalised final state."""
    n, K, S, A = len(envs), context_len, len(state_mean), envs[0].action_space.shape[0]
    norm = lambda o: (torch.as_tensor(np.asarray(o), dtype=torch.float32, device=device) - state_mean) / state_std
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
        dist = squashed_gaussian(mean, log_std)
        # Clamped so the stored action has a finite atanh: rollout and training log-probs are computed alike.
        act = torch.tanh(mean) if deterministic else dist.sample().clamp(-1 + 1e-6, 1 - 1e-6)
        logp = action_log_prob(mean, log_std, act, action_margin) if not deterministic else torch.zeros(len(live), device=device)
        actions[live, -1] = act
        step_tokens = [x.cpu().numpy() for x in (states[live, -1], rtg[live, -1, 0], act, logp)]
        for j, i in enumerate(live.tolist()):
            o, r, term, trunc, _ = envs[i].step(step_tokens[2][j])
            for k, v in zip(rec[i], [x[j] for x in step_tokens] + [r]):
                rec[i][k].append(v)
            obs[i], target[i] = o, target[i] - r * rtg_scale
            if term or trunc:
                alive[i], done[i] = False, (term, norm(o).cpu().numpy())
    return [{"states": np.stack(r["states"]).astype(np.float32), "rtg": np.array(r["rtg"], np.float32),
             "actions": np.stack(r["actions"]).astype(np.float32), "logp": np.array(r["logp"], np.float32),
             "rewards": np.array(r["rewards"], np.float32), "terminated": bool(d[0]), "last_state": d[1]}
            for r, d in zip(rec, done)]


@torch.no_grad()
def flatten_buffer(buffer, value_net, gamma, lam, relabel, rtg_scale, device):
    """Algorithm 2 line 3: GAE for every step of every buffered trajectory under the current value net.

    RTG tokens are the rollout's own unless `relabel`, which swaps in achieved returns (the failure mode)."""
    cat = lambda key: np.concatenate([t[key] for t in buffer])
    states = cat("states")
    values = value_net(torch.as_tensor(states, device=device)).cpu().numpy()
    last_values = value_net(torch.as_tensor(np.stack([t["last_state"] for t in buffer]), device=device)).cpu().numpy()
    lengths = np.array([len(t["rewards"]) for t in buffer])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    adv = np.concatenate([compute_gae(t["rewards"], values[o:o + n], last_values[i], t["terminated"], gamma, lam)
                          for i, (t, o, n) in enumerate(zip(buffer, offsets, lengths))])
    rtg = np.concatenate([relabel_rtg(t["rewards"], rtg_scale) for t in buffer]) if relabel else cat("rtg")
    return dict(states=states, actions=cat("actions"), rtg=rtg, logp=cat("logp"), adv=adv, returns=adv + values,
                values=values, lengths=lengths, offsets=offsets)


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
    to = lambda x: torch.as_tensor(x, device=device)
    token = offsets[traj] + steps
    return dict(rtg=to(flat["rtg"][src][..., None]), states=to(flat["states"][src]), actions=to(flat["actions"][src]),
                mask=to(window >= 0), act=to(flat["actions"][token]), old_logp=to(flat["logp"][token]),
                adv=to(flat["adv"][token]), returns=to(flat["returns"][token]), value_states=to(flat["states"][token]))


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
    t0 = time.time()  # the --max-seconds budget counts the whole run, start and evaluations included
    family, _ = env_family(args.env_id)
    preset = table7_preset(args.env_id, args.dataset)
    for k, v in preset.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.c_train = args.c_train or args.c_online
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Start: checkpoint (pretrained on demand), dim check, dropout off
    ckpt_path = Path(args.resume) if args.resume else ensure_checkpoint(args)
    model, ckpt = load_model(ckpt_path, device)
    probe = make_env(args.env_id)
    state_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    cfg = ckpt["model_config"]
    if (cfg["state_dim"], cfg["act_dim"]) != (state_dim, act_dim):
        raise UserError(f"{ckpt_path} has state/action dims ({cfg['state_dim']}, {cfg['act_dim']}) but {args.env_id} "
                        f"has ({state_dim}, {act_dim})")
    horizon = args.max_episode_steps or probe.spec.max_episode_steps
    state_mean, state_std = ckpt["state_mean"].to(device), ckpt["state_std"].to(device)
    rtg_scale, ref_min, ref_max = ckpt["rtg_scale"], ckpt["ref_min_score"], ckpt["ref_max_score"]
    target_entropy = args.target_entropy if args.target_entropy is not None else -float(act_dim)
    value_scale = args.value_scale or ckpt["eval_rtg"] / horizon * min(horizon, 1 / (1 - args.gamma))
    value_net = ValueNet(state_dim, args.value_hidden or (256 if family == "mujoco" else 512),
                         family != "mujoco" if args.value_layer_norm is None else args.value_layer_norm,
                         value_scale).to(device)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    log_kappa = torch.tensor(float(np.log(args.kappa_initial)), device=device, requires_grad=True)
    policy_opt = Lamb(model.parameters(), lr=args.lr_policy, weight_decay=args.weight_decay)
    value_opt = torch.optim.AdamW(value_net.parameters(), lr=args.lr_value)
    kappa_opt = torch.optim.Adam([log_kappa], lr=args.kappa_lr)
    buffer = deque(maxlen=args.buffer_factor * args.k_ppo)
    rng = np.random.default_rng(args.seed)
    start_it, env_steps, grad_updates = 1, 0, 0
    if args.resume:
        if "finetune" not in ckpt:
            raise UserError(f"--resume {ckpt_path} has no 'finetune' state; pass a pretrained one with --checkpoint")
        ft = ckpt["finetune"]
        value_net.load_state_dict(ft["value_net"]), ref_model.load_state_dict(ft["ref_model"])
        policy_opt.load_state_dict(ft["policy_opt"]), value_opt.load_state_dict(ft["value_opt"])
        kappa_opt.load_state_dict(ft["kappa_opt"])
        with torch.no_grad():
            log_kappa.copy_(ft["log_kappa"])
        buffer.extend(ft["buffer"])
        rng.bit_generator.state = ft["numpy_rng"]
        torch.set_rng_state(ft["torch_rng"])
        start_it, env_steps, grad_updates = ft["iteration"] + 1, ft["env_steps"], ft["grad_updates"]
    save_path = Path(args.save_path) if args.save_path else Path("checkpoints") / f"{run_name}.pt"

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name,
                   sync_tensorboard=True, save_code=True)
    writer = SummaryWriter(f"{args.runs_dir}/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    env_kw = {"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}
    train_envs = [make_env(args.env_id, **env_kw) for _ in range(args.k_ppo)]
    eval_envs = [make_env(args.env_id, render_mode="rgb_array", **env_kw) if (i == 0 and args.capture_video)
                 else make_env(args.env_id, **env_kw) for i in range(args.eval_episodes)]
    if args.capture_video:
        eval_envs[0] = gym.wrappers.RecordVideo(eval_envs[0], f"videos/{run_name}")
    roll = dict(rtg_scale=rtg_scale, context_len=args.c_online, state_mean=state_mean, state_std=state_std,
                device=device, action_margin=ckpt.get("action_margin", 1e-6))

    def evaluate(it):
        """Deterministic episodes conditioned on the checkpoint's eval RTG (same seeds every iteration)."""
        model.eval()
        eps = rollout(model, eval_envs, [args.seed + 10_000 + i for i in range(len(eval_envs))], ckpt["eval_rtg"],
                      deterministic=True, **roll)
        rets = np.array([e["rewards"].sum() for e in eps])
        score = float(np.mean(100.0 * (rets - ref_min) / (ref_max - ref_min)))
        writer.add_scalar("charts/normalized_score", score, it)
        writer.add_scalar("charts/eval_return", rets.mean(), it)
        return score, float(rets.mean())

    def save(it, score):
        payload = {**{k: v for k, v in ckpt.items() if k != "finetune"}, "eval_normalized_score": score,
                   "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
        payload["finetune"] = dict(
            iteration=it, env_steps=env_steps, grad_updates=grad_updates, args=asdict(args), buffer=list(buffer),
            value_net=value_net.state_dict(), ref_model=ref_model.state_dict(), policy_opt=policy_opt.state_dict(),
            value_opt=value_opt.state_dict(), kappa_opt=kappa_opt.state_dict(), log_kappa=log_kappa.detach().cpu(),
            numpy_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state())
        save_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, save_path.with_suffix(".tmp"))
        os.replace(save_path.with_suffix(".tmp"), save_path)  # atomic: a crash never leaves half a file

    # Iteration 0: the loaded checkpoint, before any update
    score, eval_return = evaluate(start_it - 1)
    tqdm.write(f"iteration {start_it - 1}: eval return {eval_return:.1f}, normalized score {score:.1f} "
               f"(pretrained: {ckpt['eval_normalized_score']:.1f})")
    start_time, start_steps = time.time(), env_steps
    pbar = tqdm(range(start_it, args.num_iterations + 1), desc="ppo-dt", initial=start_it - 1,
                total=args.num_iterations)
    for it in pbar:
        # Line 2: K_PPO stochastic rollouts conditioned on g_online; FIFO buffer update
        model.eval()
        trajs = rollout(model, train_envs, [args.seed * 1_000_003 + it * args.k_ppo + i for i in range(args.k_ppo)],
                        args.g_online, deterministic=False, **roll)
        buffer.extend(trajs)
        env_steps += sum(len(t["rewards"]) for t in trajs)

        # Line 3: GAE over the buffer with the current value net (no relabeling unless --relabel)
        flat = flatten_buffer(buffer, value_net, args.gamma, args.gae_lambda, args.relabel, rtg_scale, device)

        # Lines 4-6: sub-trajectory batches, Eq. 5 for the policy, Eq. 6 for the value net
        model.train()  # dropout is 0, so train mode changes nothing: the ratio is exactly 1 at the first update
        stats = []
        for _ in range(args.updates_per_iteration):
            b = sample_batch(flat, args.n_batch, args.c_train, args.c_online, rng, device)
            mean, log_std = (x[:, -1] for x in model(b["rtg"], b["states"], b["actions"], b["mask"]))
            dist = squashed_gaussian(mean, log_std)
            adv = normalize_advantages(b["adv"]) if args.norm_adv else b["adv"]
            logp = action_log_prob(mean, log_std, b["act"], ckpt.get("action_margin", 1e-6))
            pg_loss, approx_kl, clipfrac = ppo_policy_loss(logp, b["old_logp"], adv, args.clip_coef)
            entropy = -dist.log_prob(dist.rsample()).mean()  # single-sample estimate: no closed form after tanh
            with torch.no_grad():
                ref_mean, ref_log_std = (x[:, -1] for x in ref_model(b["rtg"], b["states"], b["actions"], b["mask"]))
            kl_ref = kl_divergence(Independent(Normal(mean, log_std.exp()), 1),
                                   Independent(Normal(ref_mean, ref_log_std.exp()), 1)).mean()
            kappa = log_kappa.exp()
            loss = pg_loss + args.beta * kl_ref - kappa.detach() * entropy
            policy_opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            policy_opt.step()
            kappa_loss = kappa * (entropy.detach() - target_entropy)  # kappa rises while entropy < target
            kappa_opt.zero_grad()
            kappa_loss.backward()
            kappa_opt.step()
            v_loss = value_loss(value_net(b["value_states"]), b["returns"])
            value_opt.zero_grad()
            v_loss.backward()
            nn.utils.clip_grad_norm_(value_net.parameters(), args.max_grad_norm)
            value_opt.step()
            grad_updates += 1
            if grad_updates % args.ref_update_every == 0:  # the slowly refreshed reference policy
                ref_model.load_state_dict(model.state_dict())
            stats.append([x.item() for x in (pg_loss, v_loss, approx_kl, clipfrac, entropy, kappa, kl_ref)])

        # Logging: global step = iteration
        score, eval_return = evaluate(it)
        sps = (env_steps - start_steps) / (time.time() - start_time)
        names = ("policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy", "kappa", "kl_ref")
        for name, value in zip(names, np.mean(stats, axis=0)):
            writer.add_scalar(f"losses/{name}", value, it)
        writer.add_scalar("losses/explained_variance", explained_variance(flat["values"], flat["returns"]), it)
        writer.add_scalar("charts/episodic_return", np.mean([t["rewards"].sum() for t in trajs]), it)
        writer.add_scalar("charts/env_steps", env_steps, it)
        writer.add_scalar("charts/grad_updates", grad_updates, it)
        writer.add_scalar("charts/SPS", sps, it)
        pbar.set_postfix(score=f"{score:.1f}", ret=f"{eval_return:.0f}", sps=f"{sps:.0f}")
        tqdm.write(f"iteration {it}: eval return {eval_return:.1f}, normalized score {score:.1f}, "
                   f"env steps {env_steps}, SPS {sps:.0f}")
        out_of_budget = (args.total_env_steps and env_steps >= args.total_env_steps) or \
            (args.max_seconds and time.time() - t0 >= args.max_seconds)
        if args.save_every and (it % args.save_every == 0 or it == args.num_iterations or out_of_budget):
            save(it, score)
        if out_of_budget:
            break
    writer.close()
    return score


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
