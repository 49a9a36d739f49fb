"""ODT and ODT+TD3: online finetuning of a pretrained Decision Transformer with hindsight-relabeled supervised
learning, optionally plus TD3 gradients from a twin critic.

Baselines of "Online Finetuning Decision Transformers with Pure RL Gradients" (Luo & Zhu), Sections 2 and 3.1:
ODT (Zheng et al., 2022) and ODT+TD3 (Yan et al., 2024, "RL gradients as vitamin"). Both start from the
checkpoint written by pretrain_dt.py.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch and the env resets); also picks the default checkpoint"""
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
    """pretraining dataset (short name or Minari id): names the default checkpoint, passed on to pretrain_dt.py"""
    dataset_path: Optional[str] = None
    """a D4RL HDF5 file, passed to pretrain_dt.py when the checkpoint has to be made"""
    checkpoint: Optional[str] = None
    """pretrained checkpoint; default `checkpoints/{env_id}__{dataset}__s{seed}.pt`, made by pretrain_dt.py if absent"""
    pretrain_extra_args: str = ""
    """extra pretrain_dt.py flags (one shell string) for when the checkpoint has to be made"""

    algo: str = "odt_td3"
    """odt_td3 (deterministic actor + TD3 critic gradients) or odt (stochastic NLL + entropy actor, alpha = 0)"""
    rl_coef: float = 0.1
    """alpha, weight of mean(-Q1(s, a_pred)) in the odt_td3 actor loss (Yan et al.); --algo odt uses 0"""
    num_iterations: int = 300
    """outer iterations: one training rollout, the updates, an evaluation; 0 only evaluates the checkpoint"""
    total_env_steps: int = 0
    """training env-step budget (0: none); stop after the iteration that reaches it; eval steps do not count"""
    max_seconds: float = 0
    """wall-clock budget in seconds from launch (0: none); stop after the iteration that reaches it"""
    actor_updates: int = 300
    """DT (actor) updates per iteration (ODT, ODT+TD3)"""
    critic_updates: Optional[int] = None
    """critic updates per iteration; default 600 MuJoCo (actor every 2nd, TD3's delay), 300 Adroit/AntMaze"""
    critic_pretrain_updates: int = 5000
    """critic updates on the offline data before the online phase, DT frozen (the original trains it while pretraining)"""
    batch_size: int = 256
    """segments per update (actor and critic)"""
    context_len: Optional[int] = None
    """training context; default the checkpoint's c_offline"""
    eval_context_len: int = 5
    """context of rollouts and evaluation (ODT's eval_context_length); pretrain_dt.py evaluates at c_offline (20 MuJoCo)"""
    learning_rate: float = 1e-4
    """peak LAMB learning rate of the DT (ODT's online lr)"""
    warmup_updates: int = 1000
    """linear lr warm-up of the fresh LAMB state, in DT updates (ODT's 10k warm-up spans pretraining and finetuning)"""
    weight_decay: float = 1e-4
    """LAMB weight decay (Table 5; ODT's code used 5e-4)"""
    max_grad_norm: float = 0.5
    """DT gradient-norm clip (Table 5; ODT's code used 0.25)"""
    dropout: float = 0.0
    """DT dropout while finetuning: Table 5 disables it (the original codebases keep 0.1)"""
    temperature_lr: float = 1e-4
    """Adam lr of the log-temperature dual variable (--algo odt), initialised from the checkpoint"""
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
    online_rtg: Optional[float] = None
    """RTG conditioning training rollouts; default ODT / Table 6 (Hopper 7200, Walker 10000, Ant 12000, door 3000...)"""
    replay_size: int = 1000
    """trajectories in the FIFO replay buffer (ODT)"""
    max_episode_steps: Optional[int] = None
    """cap on the env's time limit, for rollouts and evaluation (tests, quick runs); default the env's own"""
    eval_episodes: int = 10
    """deterministic tanh(mean) evaluation episodes per iteration, stepped as one batch"""
    save_every: int = 0
    """write a finetuned checkpoint every this many iterations and at the end (0: never)"""
    save_path: Optional[str] = None
    """where --save-every writes; default `checkpoints/{env_id}__{exp_name}__{algo}__s{seed}.pt`"""
    resume: Optional[str] = None
    """a checkpoint written by --save-every: continue that run (same env and algo) up to --num-iterations"""


class UserError(Exception):
    """Bad input: printed as one line, never as a traceback."""


# ---------------------------------------------------------------- envs and data
MUJOCO_ENVS = {"Hopper": "hopper", "Walker2d": "walker2d", "Ant": "ant", "HalfCheetah": "halfcheetah"}
ADROIT_ENVS = {"AdroitHandDoor": "door", "AdroitHandHammer": "hammer", "AdroitHandPen": "pen"}
SUPPORTED = "MuJoCo Hopper/Walker2d/Ant/HalfCheetah-v4|v5, Adroit AdroitHandDoor/Hammer/Pen-v1, AntMaze_UMaze-v4|v5"
ONLINE_RTG = {"hopper": 7200, "walker2d": 10000, "ant": 12000, "halfcheetah": 12000,
              "door": 3000, "hammer": 4000, "pen": 6000, "antmaze": 2}
# What the critic sees of a reward (Yan et al.): Adroit rescaled, AntMaze shifted by -1 per step, MuJoCo raw.
CRITIC_REWARD = {"hammer": lambda r: r / 1000, "door": lambda r: r / 100, "pen": lambda r: r / 100,
                 "relocate": lambda r: r / 100, "antmaze": lambda r: r - 1.0}


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


def load_offline_trajectories(ckpt: dict) -> list[dict]:
    """The checkpoint's dataset as trajectories with T+1 observations (a truncated one bootstraps from the last)."""
    family, _ = env_family(ckpt["env_id"])
    path = (ckpt.get("pretrain_args") or {}).get("dataset_path")
    if path:
        import h5py

        with h5py.File(path, "r") as f:
            d = {k: f[k][()] for k in f.keys() if k in ("observations", "next_observations", "actions", "rewards",
                                                          "terminals", "timeouts")}
        ends = np.append(np.flatnonzero(d["terminals"] | d["timeouts"]) + 1, len(d["rewards"]))
        nxt = d.get("next_observations", d["observations"])  # without next_observations the last obs is repeated
        bounds = [(a, b) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends) if b > a]
        trajs = [dict(observations=np.concatenate([d["observations"][a:b], nxt[b - 1:b]]), actions=d["actions"][a:b],
                      rewards=d["rewards"][a:b], terminated=bool(d["terminals"][b - 1])) for a, b in bounds]
    else:
        import minari

        if ckpt["dataset_id"] not in minari.list_local_datasets():
            raise UserError(f"the checkpoint's dataset {ckpt['dataset_id']!r} is not in the local Minari cache "
                            f"({os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')}); set "
                            "MINARI_DATASETS_PATH")
        trajs = [dict(observations=flatten_antmaze_obs(ep.observations) if family == "antmaze" else ep.observations,
                      actions=ep.actions, rewards=ep.rewards, terminated=bool(ep.terminations[-1]))
                 for ep in minari.load_dataset(ckpt["dataset_id"]).iterate_episodes()]
    if family == "antmaze":
        trajs = [t for t in trajs if len(t["rewards"]) > 1]  # as pretraining: 1-step trajectories dropped
    return [{**t, **{k: np.asarray(t[k], np.float32) for k in ("observations", "actions", "rewards")}} for t in trajs]


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
    """Tokens (RTG_t, s_t, a_t) per step, no positional embedding; the s_t output is a pre-tanh Gaussian over a_t."""

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
        real = pad_mask.repeat_interleave(3, dim=1)
        causal = torch.ones(3 * T, 3 * T, dtype=torch.bool, device=x.device).tril()
        mask = (causal & real[:, None, :]) | torch.eye(3 * T, dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, mask[:, None])
        h = self.ln_f(x).view(B, T, 3, -1)[:, :, 1]
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


def load_model(path, device="cpu", dropout: Optional[float] = None):
    """(model, ckpt) from a pretrain_dt.py (or finetuned) checkpoint; the state dict must load strictly."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("format_version") != 1:
        raise UserError(f"{path} is not a format-1 pretrain_dt.py checkpoint")
    cfg = {k: v for k, v in ckpt["model_config"].items() if k not in ("activation", "c_offline")}
    model = DecisionTransformer(**{**cfg, **({} if dropout is None else {"dropout": dropout})})
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device), ckpt


class TwinCritic(nn.Module):
    """Two Markovian Q-MLPs (s+a) -> h -> h -> 1, ReLU; optional non-affine LayerNorm (Yan et al., outside MuJoCo)."""

    def __init__(self, state_dim, act_dim, hidden=256, layer_norm=False):
        super().__init__()

        def q_net():
            norm = (lambda: nn.LayerNorm(hidden, elementwise_affine=False)) if layer_norm else nn.Identity
            return nn.Sequential(nn.Linear(state_dim + act_dim, hidden), norm(), nn.ReLU(),
                                 nn.Linear(hidden, hidden), norm(), nn.ReLU(), nn.Linear(hidden, 1))

        self.q1, self.q2 = q_net(), q_net()

    def forward(self, states, actions):
        x = torch.cat([states, actions], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


# ---------------------------------------------------------------- algorithm pieces
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
    def close(x, fill=0.0):
        return np.concatenate([x, np.full((1, *x.shape[1:]), fill, x.dtype)])

    lengths = np.array([len(t["rewards"]) for t in trajs])
    terminal = [np.arange(n + 1) == (n - 1 if t["terminated"] else -1) for n, t in zip(lengths, trajs)]
    return dict(
        lengths=lengths, offsets=np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]),
        states=((np.concatenate([t["observations"] for t in trajs]) - state_mean) / state_std).astype(np.float32),
        actions=np.concatenate([close(t["actions"]) for t in trajs]).astype(np.float32),
        rtg=np.concatenate([close(relabel_rtg(t["rewards"], rtg_scale)) for t in trajs]).astype(np.float32),
        rewards=np.concatenate([close(critic_reward(t["rewards"])) for t in trajs]).astype(np.float32),
        terminals=np.concatenate(terminal))


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
        y = td_target(batch["rewards"], batch["terminals"], *target_critic(batch["next_states"], next_a), gamma)
    q1, q2 = critic(batch["states"], batch["actions"])
    loss = masked_mean((q1 - y) ** 2 + (q2 - y) ** 2, batch["mask"])
    return loss, masked_mean(q1, batch["mask"]).detach()


def actor_loss(model, critic, batch, algo, rl_coef, temperature=None, action_margin=1e-6):
    """sup_loss + rl_coef * mean(-Q1(s, a_pred)). odt_td3: MSE of tanh(mean); odt: NLL - temperature * entropy
    (single-sample estimate, padding masked). With rl_coef = 0 the critic term is not in the graph at all."""
    mean, log_std = model(batch["rtg"], batch["states"], batch["actions"], batch["mask"])
    mask, info, a_pred = batch["mask"], {}, torch.tanh(mean)
    if algo == "odt":
        dist = squashed_gaussian(mean, log_std)
        nll = masked_mean(-action_log_prob(mean, log_std, batch["actions"], action_margin), mask)
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


@torch.no_grad()
def rollout(model, envs, seeds, meta, target_return, context_len, act_fn, device):
    """Episodes in lockstep, one batched forward per step -> trajectories (T+1 observations, `terminated` only on a
    true termination). `act_fn(mean, log_std)` picks the action: tanh(mean), plus noise, or a squashed sample."""
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
        actions[:, -1] = act_fn(mean[:, -1], log_std[:, -1])
        act_np = actions[:, -1].cpu().numpy()
        for i in np.flatnonzero(alive):
            o, r, term, trunc, _ = envs[i].step(act_np[i])
            obs[i] = o
            t = trajs[i]
            t["observations"].append(obs[i].copy()), t["actions"].append(act_np[i]), t["rewards"].append(float(r))
            target[i] -= r * scale
            alive[i], t["terminated"] = not (term or trunc), bool(term)
    model.train()
    return [{**t, **{k: np.asarray(t[k], np.float32) for k in ("observations", "actions", "rewards")}} for t in trajs]


def save_checkpoint(path: Path, payload: dict):
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def ensure_checkpoint(args: Args) -> Path:
    """The pretrained checkpoint; made with pretrain_dt.py (a subprocess) if it does not exist yet."""
    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint_path(args.env_id, args.dataset, args.seed)
    if not path.exists():
        print(f"checkpoint {path} not found; pretraining it with pretrain_dt.py")
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "pretrain_dt.py"), "--env-id", args.env_id,
               "--dataset", args.dataset, "--seed", str(args.seed), "--checkpoint", str(path)]
        cmd += ["--dataset-path", args.dataset_path] if args.dataset_path else []
        if subprocess.run(cmd + shlex.split(args.pretrain_extra_args)).returncode != 0 or not path.exists():
            raise UserError(f"pretrain_dt.py failed to make {path}: {shlex.join(cmd)}")
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
    if args.algo not in ALGOS:
        raise UserError(f"unknown --algo {args.algo!r}; choose one of {', '.join(ALGOS)}")
    family, key = env_family(args.env_id)
    if min(args.batch_size, args.eval_episodes, args.replay_size, args.eval_context_len) < 1:
        raise UserError("--batch-size, --eval-episodes, --replay-size and --eval-context-len must be at least 1")
    td3 = args.algo == "odt_td3"
    rl_coef = args.rl_coef if td3 else 0.0
    t_launch = time.time()  # --max-seconds counts from here, critic pretraining included
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(t_launch)}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Checkpoint, model and the per-family defaults
    ckpt_path = Path(args.resume) if args.resume else ensure_checkpoint(args)
    model, ckpt = load_model(ckpt_path, device, dropout=args.dropout)
    resumed = ckpt.get("finetune") if args.resume else None
    if args.resume and (resumed is None or resumed["algo"] != args.algo or ckpt["env_id"] != args.env_id):
        raise UserError(f"--resume {args.resume} is not a {args.algo} {args.env_id} checkpoint of odt_td3.py")
    if ckpt["env_id"] != args.env_id:
        raise UserError(f"checkpoint {ckpt_path} is for {ckpt['env_id']}, not --env-id {args.env_id}")
    K = args.context_len or ckpt["model_config"]["c_offline"]
    K_eval = args.eval_context_len
    n_critic = (600 if family == "mujoco" else 300) if args.critic_updates is None else args.critic_updates
    n_critic = n_critic if td3 else 0
    gamma = args.gamma if args.gamma is not None else (0.998 if family == "antmaze" else 0.99)
    online_rtg = args.online_rtg if args.online_rtg is not None else ONLINE_RTG[key]
    ref_min, ref_max = ckpt["ref_min_score"], ckpt["ref_max_score"]
    meta = dict(rtg_scale=ckpt["rtg_scale"], state_mean=ckpt["state_mean"].to(device),
                state_std=ckpt["state_std"].to(device))
    state_dim, act_dim = ckpt["model_config"]["state_dim"], ckpt["model_config"]["act_dim"]
    log_temperature = torch.tensor(float(ckpt["log_temperature"]), device=device, requires_grad=True)

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name,
                   sync_tensorboard=True, save_code=True)
    writer = SummaryWriter(f"{args.runs_dir}/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    env_kw = {} if args.max_episode_steps is None else {"max_episode_steps": args.max_episode_steps}
    video = {"render_mode": "rgb_array"} if args.capture_video else {}
    eval_envs = [make_env(args.env_id, **env_kw, **(video if i == 0 else {})) for i in range(args.eval_episodes)]
    if args.capture_video:
        eval_envs[0] = gym.wrappers.RecordVideo(eval_envs[0], f"videos/{run_name}")
    train_env = make_env(args.env_id, **env_kw)

    def evaluate(iteration):
        trajs = rollout(model, eval_envs, args.seed + 10_000 + np.arange(args.eval_episodes), meta, ckpt["eval_rtg"],
                        K_eval, lambda m, s: torch.tanh(m), device)
        rets = np.array([t["rewards"].sum() for t in trajs])
        score = float(np.mean(100.0 * (rets - ref_min) / (ref_max - ref_min)))
        writer.add_scalar("charts/eval_return", rets.mean(), iteration)
        writer.add_scalar("charts/normalized_score", score, iteration)
        return score, float(rets.mean())

    # Iteration 0: the loaded checkpoint, before any update
    history = []
    if resumed is None:
        score, ret = evaluate(0)
        history.append(dict(iteration=0, normalized_score=score, eval_return=ret))
        print(f"iteration 0 (pretrained checkpoint {ckpt_path}): return {ret:.1f}, normalized score {score:.1f}")
        if args.num_iterations == 0:
            writer.close()
            return history

    # Optimisers, targets, replay
    optimizer = Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / max(1, args.warmup_updates)))
    temperature_opt = torch.optim.Adam([log_temperature], lr=args.temperature_lr)
    critic = TwinCritic(state_dim, act_dim, args.critic_hidden, family != "mujoco" if args.critic_layer_norm is None
                        else args.critic_layer_norm).to(device)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr or (1e-3 if family == "mujoco" else 2e-4))
    target_model, target_critic = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(critic).requires_grad_(False)
    stateful = dict(optimizer=optimizer, scheduler=scheduler, temperature_opt=temperature_opt, critic=critic,
                    critic_opt=critic_opt, target_model=target_model, target_critic=target_critic)
    rng = np.random.default_rng(args.seed)
    reward_fn = CRITIC_REWARD.get(key, lambda r: r)
    flat_of = lambda trajs: flatten_buffer(trajs, ckpt["state_mean"].numpy(), ckpt["state_std"].numpy(),  # noqa: E731
                                           meta["rtg_scale"], reward_fn)
    start_it, env_steps, grad_updates = 1, 0, 0
    if resumed is None:
        buffer = TrajectoryBuffer(load_offline_trajectories(ckpt), args.replay_size)
    else:
        buffer = TrajectoryBuffer([], args.replay_size)
        buffer.trajs, buffer.next = resumed["buffer"], resumed["buffer_next"]
        for name, obj in stateful.items():
            obj.load_state_dict(resumed[name])
        rng.bit_generator.state, start_it = resumed["numpy_rng"], resumed["iteration"] + 1
        torch.set_rng_state(resumed["torch_rng"])
        env_steps, grad_updates = resumed["env_steps"], resumed["grad_updates"]
    if len(buffer.trajs) and buffer.trajs[0]["observations"].shape[1] != state_dim:
        raise UserError(f"the offline data has state dim {buffer.trajs[0]['observations'].shape[1]}, the model {state_dim}")

    def update_phase(flat, n_crit, n_act):
        """n_crit critic and n_act actor updates over the same batches (the actor on every n_crit/n_act-th batch)."""
        nonlocal grad_updates
        stats, n = {}, max(n_crit, n_act)
        for i in range(n):
            batch = sample_segments(flat, K, args.batch_size, rng, device)
            logs = {}
            if i < n_crit:
                logs["critic_loss"], logs["q_values"] = critic_loss(critic, target_critic, target_model, batch, gamma,
                                                                    args.policy_noise, args.noise_clip)
                critic_opt.zero_grad()
                logs["critic_loss"].backward()
                critic_opt.step()
                polyak_update(target_critic, critic, args.tau)
                grad_updates += 1
            if (i + 1) * n_act // n > i * n_act // n:
                loss, info = actor_loss(model, critic if td3 else None, batch, args.algo, rl_coef, log_temperature.exp(),
                                        action_margin=ckpt.get("action_margin", 1e-6))
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                if td3:
                    polyak_update(target_model, model, args.tau)
                else:  # ODT's dual step toward the target entropy
                    temperature_opt.zero_grad()
                    (log_temperature.exp() * (info["entropy"] - ckpt["target_entropy"]).detach()).backward()
                    temperature_opt.step()
                logs.update(info)
                grad_updates += 1
            for k, v in logs.items():
                stats.setdefault(k, []).append(v.detach())
        return {k: torch.stack(v).mean().item() for k, v in stats.items()}

    # Critic pretraining on the offline data (the DT is frozen: it has already been pretrained)
    if resumed is None and td3 and args.critic_pretrain_updates > 0:
        t0 = time.time()
        stats = update_phase(flat_of(buffer.trajs), args.critic_pretrain_updates, 0)
        print(f"critic pretraining: {args.critic_pretrain_updates} updates in {time.time() - t0:.0f}s, "
              f"critic loss {stats['critic_loss']:.3f}, Q {stats['q_values']:.1f}")

    explore = ((lambda m, s: (torch.tanh(m) + args.explore_noise * torch.randn_like(m)).clamp(-1.0, 1.0)) if td3
               else (lambda m, s: squashed_gaussian(m, s).sample()))
    save_path = Path(args.save_path or f"checkpoints/{args.env_id}__{args.exp_name}__{args.algo}__s{args.seed}.pt")
    start, steps_at_start, it = time.time(), env_steps, start_it - 1
    pbar = tqdm(range(start_it, args.num_iterations + 1), desc=args.algo, initial=start_it - 1, total=args.num_iterations)
    for it in pbar:
        # Rollout with exploration into the FIFO buffer
        traj = rollout(model, [train_env], [args.seed + it], meta, online_rtg, K_eval, explore, device)[0]
        buffer.add(traj)
        env_steps += len(traj["rewards"])

        # Updates on relabeled segments
        t0, u0 = time.time(), grad_updates
        stats = update_phase(flat_of(buffer.trajs), n_critic, args.actor_updates)
        updates_per_s = (grad_updates - u0) / (time.time() - t0)

        # Evaluation and logging
        score, ret = evaluate(it)
        row = dict(episodic_return=float(traj["rewards"].sum()), env_steps=env_steps, grad_updates=grad_updates,
                   SPS=(env_steps - steps_at_start) / (time.time() - start), updates_per_s=updates_per_s,
                   learning_rate=scheduler.get_last_lr()[0])
        stats.update(alpha=rl_coef, temperature=log_temperature.exp().item())
        for k, v in [*(("charts/" + k, v) for k, v in row.items()), *(("losses/" + k, v) for k, v in stats.items())]:
            writer.add_scalar(k, v, it)
        history.append(dict(iteration=it, normalized_score=score, eval_return=ret, **row, **stats))
        pbar.set_postfix(score=f"{score:.1f}", ret=f"{row['episodic_return']:.0f}", sup=f"{stats['sup_loss']:.3f}")

        done = (it == args.num_iterations or (args.total_env_steps and env_steps >= args.total_env_steps)
                or (args.max_seconds and time.time() - t_launch >= args.max_seconds))
        if args.save_every and (done or it % args.save_every == 0):
            finetune = dict(algo=args.algo, iteration=it, args=asdict(args), buffer=buffer.trajs, buffer_next=buffer.next,
                            env_steps=env_steps, grad_updates=grad_updates, numpy_rng=rng.bit_generator.state,
                            torch_rng=torch.get_rng_state(), **{k: obj.state_dict() for k, obj in stateful.items()})
            save_checkpoint(save_path, {**ckpt, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                        "log_temperature": float(log_temperature.detach()), "eval_normalized_score": score,
                                        "num_updates": ckpt["num_updates"], "finetune": finetune})
        if done:
            break
    writer.close()
    if history:
        print(f"finished at iteration {it}: normalized score {history[-1]['normalized_score']:.1f}, {env_steps} env steps")
    return history


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
