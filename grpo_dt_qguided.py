"""Q-guided GRPO-DT: online finetuning of a Decision Transformer with pure RL gradients and no state resets.

Paper: "Online Finetuning Decision Transformers with Pure RL Gradients" (Luo & Zhu), Sections 3.2 (Algorithm 1,
Eqs. 2-3, active sampling) and 3.3.1 (Q-guided GRPO-DT), Appendix B.1, Tables 5-6. Algorithm 1 with line 6 replaced:
at each sampled (s_h, g_h), G candidate actions drawn from the DT are scored by a TD3 critic, R(a_i) = Q_phi(s_h, a_i);
the scores give Eq. 2 group advantages, and Eq. 3 is optimised with a per-action ratio. The critic follows ODT+TD3
(Yan et al. 2024), as App. B.1 says: its replay is seeded with the best offline trajectories, it is pretrained on them
before iteration 1, and online trajectories replace the worst of them. `env.reset()` only starts a new episode, never
`set_state`: use this instead of grpo_dt.py when the environment cannot be put back into an arbitrary state (it also
spends far fewer env steps per iteration).

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
from contextlib import contextmanager
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
    """pretrained checkpoint; default `checkpoints/{env_id}__{dataset}__s{seed}.pt`, pretrained if missing"""
    model_size: Literal["paper", "cpu"] = "paper"
    """size of the DT that pretrain_dt.py makes when the checkpoint is missing"""
    pretrain_extra_args: str = ""
    """extra arguments for the pretrain_dt.py subprocess, e.g. "--num-updates 1000 --embed-dim 128\""""
    num_iterations: int = 200
    """outer iterations of Algorithm 1; 0 only evaluates the checkpoint"""
    total_env_steps: int = 0
    """training env-step budget (0 = none), counted across resumes: stop after the iteration that reaches it"""
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
    torch_threads: int = 0
    """CPU threads of torch (0 = torch's default); 1 is fastest for this small-batch loop on a busy CPU"""
    max_episode_steps: Optional[int] = None
    """episode length cap (a time-limit truncation) for training and evaluation envs; default the env's own"""
    save_every: int = 5
    """write the run state every this many iterations and at the end (0 = never)"""
    save_path: Optional[str] = None
    """where the run state goes; default `{runs_dir}/{run_name}/state.pt`"""
    save_model: bool = False
    """at the end, also write the finetuned DT as a format-1 checkpoint to `{runs_dir}/{run_name}/{exp_name}.pt`"""
    resume: Optional[str] = None
    """a run state (state.pt): continue that run bit-exactly, in its run directory, up to --num-iterations, with its
    own settings; only the RUN_CONTROL flags come from this command"""

    # Algorithm 1 and Appendix B.1
    full_trajs_per_iter: Optional[int] = None
    """full trajectories collected per iteration; default 1 (MuJoCo, AntMaze) or 5 (Adroit)"""
    full_buffer_size: int = 32
    """capacity of the FIFO buffer of online trajectories the scored points are drawn from (the critic has its own
    replay, --replay-size)"""
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
    clip_coef: Optional[float] = None
    """epsilon of the clipped ratio; default Table 6"""
    delta_r: Optional[float] = None
    """Table 6's Delta_r (raw return units); filters the Q scores only with --delta-r-q None"""
    delta_r_q: Optional[float] = 0.0
    """drop candidates whose Q score is within this many group stds of the group mean (scale-free; 0 drops only exact
    ties); None applies --delta-r to the Q scores as the paper does, which on Hopper kept a median 7.8% of candidates"""
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
    critic_pretrain_updates: Optional[int] = None
    """critic updates on the offline data, DT frozen, before iteration 1 (ODT+TD3); default ODT+TD3's 10000 MuJoCo,
    40000 Adroit, 200000 AntMaze"""
    replay_size: Optional[int] = None
    """trajectories in the critic's replay: seeded with the best offline ones by return, which the online ones replace
    worst first, then oldest first (ODT+TD3); default ODT+TD3's 1000 MuJoCo, 5000 Adroit, 2000 AntMaze"""
    critic_warmup_updates: int = 3000
    """critic updates, pretraining included, done before any candidates are scored and the policy starts learning"""
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


# Flags a resumed run takes from its new command line; every other one comes from the saved run (resumed_args).
RUN_CONTROL = (
    "num_iterations total_env_steps max_seconds eval_episodes save_every save_path save_model resume runs_dir cuda track "
    "wandb_project_name wandb_entity capture_video torch_threads"
).split()


# ---------------------------------------------------------------- envs and presets
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


# Table 6 per env key: n_batch, c_online, g_online, clip_coef, delta_r. HalfCheetah is not in Table 6: ODT's online
# RTG 12000 with the other MuJoCo values.
TABLE6 = {
    "hopper": (256, 1, 7200, 0.2, 2.0),
    "walker2d": (256, 1, 10000, 0.3, 2.0),
    "ant": (256, 1, 12000, 0.3, 2.0),
    "halfcheetah": (256, 1, 12000, 0.3, 2.0),
    "door": (512, 1, 3000, 0.3, 0.4),
    "pen": (512, 1, 6000, 0.3, 0.0),
    "hammer": (512, 5, 4000, 0.3, 0.8),
    "antmaze": (256, 1, 2, 0.2, 0.0),
}
TABLE6_BY_DATASET = {
    ("door", "cloned"): {"delta_r": 0.5},
    ("hammer", "cloned"): {"delta_r": 0.0},
    ("antmaze", "diverse"): {"c_online": 5},
}
# Critic rewards as ODT+TD3: Adroit scaled down, MuJoCo raw, AntMaze shifted by -1 per step.
REWARD_SCALE = {"door": 1e-2, "pen": 1e-2, "hammer": 1e-3}
# ODT+TD3's critic replay and pretraining per family (odt_td3.py's PRESETS).
CRITIC_PRESETS = {
    "mujoco": dict(replay_size=1000, critic_pretrain_updates=10_000),
    "adroit": dict(replay_size=5000, critic_pretrain_updates=40_000),
    "antmaze": dict(replay_size=2000, critic_pretrain_updates=200_000),
}


def apply_presets(args: Args) -> Args:
    """Fill every None with the paper's value for this env family / dataset (Table 6, B.1, ODT+TD3); check sizes."""
    family, key = env_family(args.env_id)
    table = dict(zip(("n_batch", "c_online", "g_online", "clip_coef", "delta_r"), TABLE6[key]))
    for (k, word), override in TABLE6_BY_DATASET.items():
        if k == key and word in args.dataset:
            table.update(override)
    table.update(
        full_trajs_per_iter=5 if family == "adroit" else 1,
        critic_updates=600 if family == "mujoco" else 300,
        critic_lr=1e-3 if family == "mujoco" else 2e-4,
        gamma=0.998 if family == "antmaze" else 0.99,
        **CRITIC_PRESETS[family],
    )
    args = replace(args, **{k: v for k, v in table.items() if getattr(args, k) is None})
    args.eval_context_len = args.eval_context_len or args.c_online
    if args.group_size < 2 or min(args.eval_episodes, args.full_trajs_per_iter, args.c_online, args.replay_size) < 1:
        raise UserError(
            "need --group-size >= 2 (a group of one has no advantage) and --eval-episodes, "
            "--full-trajs-per-iter, --c-online, --replay-size >= 1"
        )
    return args


def make_envs(args: Args, run_name: str) -> tuple[list, list]:
    """(training envs, evaluation envs); the first evaluation env records videos with --capture-video."""
    kwargs = {"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}
    train_envs = [make_env(args.env_id, **kwargs) for _ in range(args.full_trajs_per_iter)]
    video = {"render_mode": "rgb_array"} if args.capture_video else {}
    eval_envs = [make_env(args.env_id, **kwargs, **(video if i == 0 else {})) for i in range(args.eval_episodes)]
    if args.capture_video:
        eval_envs[0] = gym.wrappers.RecordVideo(eval_envs[0], f"videos/{run_name}")
    return train_envs, eval_envs


def load_offline_trajectories(ckpt: dict, meta: dict) -> list[dict]:
    """The checkpoint's dataset as odt_td3.py loads it, in the rollouts' layout: T+1 normalised states (a truncated
    trajectory bootstraps from its last), hindsight RTG tokens (the achieved return-to-go, as pretraining saw them),
    T+1 actions (the last zero), rewards and whether the episode terminated."""
    family, _ = env_family(ckpt["env_id"])
    path = (ckpt.get("pretrain_args") or {}).get("dataset_path")
    raw = []
    if path:
        import h5py

        keys = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")
        with h5py.File(path, "r") as f:
            d = {k: f[k][()] for k in f.keys() if k in keys}
        ends = np.append(np.flatnonzero(d["terminals"] | d["timeouts"]) + 1, len(d["rewards"]))
        nxt = d.get("next_observations", d["observations"])  # without next_observations the last obs is repeated
        for a, b in [(a, b) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends) if b > a]:
            obs = np.concatenate([d["observations"][a:b], nxt[b - 1 : b]])
            raw.append((obs, d["actions"][a:b], d["rewards"][a:b], bool(d["terminals"][b - 1])))
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
            raw.append((obs, ep.actions, ep.rewards, bool(ep.terminations[-1])))
    trajs = []
    for obs, actions, rewards, terminated in raw:
        if family == "antmaze" and len(rewards) < 2:
            continue  # as pretraining: 1-step trajectories dropped
        rtg = np.append(np.cumsum(np.asarray(rewards, np.float64)[::-1])[::-1], 0.0) * meta["rtg_scale"]
        trajs.append(
            {
                "states": (np.asarray(obs, np.float32) - meta["state_mean"]) / meta["state_std"],
                "rtg": rtg.astype(np.float32),
                "actions": np.concatenate([actions, np.zeros((1, actions.shape[1]))]).astype(np.float32),
                "rewards": np.asarray(rewards, np.float32),
                "terminated": terminated,
            }
        )
    return trajs


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
    """TD3's twin Q: (s, a) -> 256 -> 256 -> 1 with ReLU (ODT+TD3); non-affine LayerNorm outside MuJoCo."""

    def __init__(self, state_dim, act_dim, hidden=256, layer_norm=False):
        super().__init__()
        norm = nn.LayerNorm if layer_norm else nn.Identity  # Identity ignores its arguments
        self.q1, self.q2 = [
            nn.Sequential(
                nn.Linear(state_dim + act_dim, hidden),
                norm(hidden, elementwise_affine=False),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                norm(hidden, elementwise_affine=False),
                nn.ReLU(),
                nn.Linear(hidden, 1),
            )
            for _ in range(2)
        ]

    def forward(self, states, actions):
        x = torch.cat([states, actions], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


# ---------------------------------------------------------------- algorithm pieces
EPS_ACTION = 1e-6  # actions are kept inside (-1, 1) so atanh in log_prob stays finite


class NonFinite(Exception):
    """A non-finite loss, action or Q value; main stops the run with a one-line UserError."""


def check_finite(what: str, x: torch.Tensor):
    if not torch.isfinite(x).all():
        raise NonFinite(what)


def policy_head(model, ctx):
    """The DT's pre-tanh mean and log-std for the last context slot."""
    mean, log_std = model(*ctx)
    return mean[:, -1], log_std[:, -1]


def group_advantages(scores, delta_r, delta_r_q=None):
    """Eq. 2 per group (row of `scores`, (N, G)) and the filter: keep |adv| > delta_r_q (in group stds), or with
    delta_r_q None the paper's |score - group mean| > Delta_r."""
    centred = scores - scores.mean(dim=1, keepdim=True)
    adv = centred / (scores.std(dim=1, correction=0, keepdim=True) + 1e-8)
    return adv, centred.abs() > delta_r if delta_r_q is None else adv.abs() > delta_r_q


@torch.no_grad()
def q_guided_scores(model, critic, ctx, group_size, reward_scale, action_margin=1e-6, censor_bound=None):
    """Section 3.3.1: G actions per context from pi_theta(.|s_h, g_h), scored R(a_i) = min(Q1, Q2)(s_h, a_i).

    Scores are divided by the critic's reward scale so Delta_r is in raw reward units, as in grpo_dt.py.
    Returns actions (N, G, A), their log-probs under pi_theta (N, G) and the scores (N, G).
    """
    mean, log_std = policy_head(model, ctx)
    actions = squashed_gaussian(mean, log_std).sample((group_size,)).clamp(-1 + EPS_ACTION, 1 - EPS_ACTION)  # (G, N, A)
    log_probs = action_log_prob(mean, log_std, actions, action_margin, censor_bound)
    states = ctx[1][:, -1].expand(group_size, -1, -1)  # s_h, the newest state of each context
    scores = torch.min(*critic(states, actions)) / reward_scale
    check_finite("Q value", scores)
    return actions.transpose(0, 1), log_probs.T, scores.T


def policy_objective(model, ref_model, batch, clip_coef, action_margin=1e-6, censor_bound=None):
    """The terms of Eq. 3 on a minibatch of the sample buffer: the clipped surrogate with a per-action ratio (each
    hypothetical sub-trajectory is the one action), KL(pi || pi_ref) of the pre-tanh Gaussians (closed form; the tanh
    is shared so it cancels), and ODT's single-sample entropy estimate (the tanh-Gaussian has no closed form)."""
    ctx = (batch["rtg"], batch["states"], batch["ctx_actions"], batch["mask"])
    mean, log_std = policy_head(model, ctx)
    new_log_prob = action_log_prob(mean, log_std, batch["action"], action_margin, censor_bound)
    ratio = (new_log_prob - batch["old_log_prob"]).exp()
    adv = batch["advantage"]
    pg_loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_coef, 1 + clip_coef) * adv).mean()
    with torch.no_grad():
        ref_mean, ref_log_std = policy_head(ref_model, ctx)
    dist = squashed_gaussian(mean, log_std)
    entropy = -dist.log_prob(dist.rsample()).mean()  # computed before the KL: autograd then sums gradients as before
    kl = kl_divergence(Normal(mean, log_std.exp()), Normal(ref_mean, ref_log_std.exp())).sum(-1).mean()
    clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return dict(pg_loss=pg_loss, ratio=ratio, clipfrac=clipfrac, kl=kl, entropy=entropy)


def td_target(rewards, terminated, next_q1, next_q2, gamma):
    """TD3 target r + gamma (1 - terminated) min(Q1', Q2'): termination cuts the bootstrap, truncation keeps it."""
    return rewards + gamma * (1.0 - terminated.float()) * torch.min(next_q1, next_q2)


def contexts(traj, hs, c, starts=0):
    """DT inputs whose newest slot is step h (one per entry of hs): the last c tokens, left-padded, with the RTGs
    of the rollout (no hindsight relabeling) and the action slot at h zeroed, exactly as the rollout fed them.
    `traj` may also be several trajectories back to back, with `starts` the first row of each h's trajectory."""
    offs = hs[:, None] - (c - 1) + np.arange(c)[None]
    mask = offs >= np.reshape(starts, (-1, 1))
    idx = np.where(mask, offs, 0)
    rtg = np.where(mask, traj["rtg"][idx], 0.0)[..., None]
    states = np.where(mask[..., None], traj["states"][idx], 0.0)
    actions = np.where((mask & (offs < hs[:, None]))[..., None], traj["actions"][idx], 0.0)
    return rtg.astype(np.float32), states.astype(np.float32), actions.astype(np.float32), mask


def sample_points(traj_buffer, n_trajectories, k, c, rng, device):
    """Algorithm 1 lines 3-5: trajectories drawn in proportion to length, then K steps of each by active sampling
    (softmax over the steps of the mean action variance sigma_h^2; scored by the critic here, never reset to).
    Returns the DT contexts of those (s_h, g_h) as tensors (rtg, states, actions, mask)."""
    lengths = np.array([len(t["rewards"]) for t in traj_buffer])
    picks = rng.choice(len(traj_buffer), size=n_trajectories, p=lengths / lengths.sum())
    ctx = []
    for j in picks:
        z = np.asarray(traj_buffer[j]["var"], np.float64)
        p = np.exp(z - z.max())
        ctx.append(contexts(traj_buffer[j], rng.choice(lengths[j], size=k, p=p / p.sum(), replace=lengths[j] < k), c))
    return tuple(torch.as_tensor(np.concatenate(x), device=device) for x in zip(*ctx))


class FifoBuffer:
    """Fixed-capacity FIFO of equally-long tensors (the Q-guided sample buffer, T_sub of Algorithm 1)."""

    def __init__(self, capacity):
        self.capacity, self.data = capacity, {}

    def __len__(self):
        return len(next(iter(self.data.values()))) if self.data else 0

    def push(self, **items):
        self.data = {
            k: torch.cat([self.data[k], v])[-self.capacity :] if self.data else v[-self.capacity :] for k, v in items.items()
        }

    def sample(self, n, rng):
        idx = torch.as_tensor(rng.choice(len(self), size=n, replace=n > len(self)))
        return {k: v[idx] for k, v in self.data.items()}


class TrajectoryBuffer:
    """The critic's replay, as ODT+TD3's: seeded with the top-`capacity` offline trajectories by return, held in
    ascending return order so the first online trajectories replace the worst offline ones; after that, oldest first."""

    def __init__(self, trajs: list[dict], capacity: int):
        self.trajs = sorted(trajs, key=lambda t: float(t["rewards"].sum()))[-capacity:]
        self.capacity, self.next = capacity, 0

    def add(self, traj: dict):
        if len(self.trajs) < self.capacity:
            self.trajs.append(traj)
        else:
            self.trajs[self.next] = traj
            self.next = (self.next + 1) % self.capacity


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
        s_norm = (obs.astype(np.float32) - meta["state_mean"]) / meta["state_std"]  # float32, as every script
        # Shift the context one step left and write the newest state and RTG in the last slot.
        states, actions, rtg, mask = (x.roll(-1, dims=1) for x in (states, actions, rtg, mask))
        states[:, -1], rtg[:, -1, 0] = torch.as_tensor(s_norm, device=device), torch.as_tensor(rtg_now, device=device)
        actions[:, -1], mask[:, -1] = 0.0, True
        mean, log_std = policy_head(model, (rtg, states, actions, mask))
        act = torch.tanh(mean) if deterministic else squashed_gaussian(mean, log_std).sample()
        actions[:, -1] = act = act.clamp(-1 + EPS_ACTION, 1 - EPS_ACTION)
        check_finite("action", act)
        act_np, var = act.cpu().numpy(), (2 * log_std).exp().mean(-1).cpu().numpy()
        for i in np.flatnonzero(alive):
            o, r, term, trunc, _ = envs[i].step(act_np[i])
            for k, v in zip(rec[i], (s_norm[i], rtg_now[i], act_np[i], r, var[i])):
                rec[i][k].append(v)
            obs[i] = o
            rtg_now[i] -= np.float32(r * rtg_scale)
            if term or trunc:
                alive[i] = False
                final = (o.astype(np.float32) - meta["state_mean"]) / meta["state_std"]
                r_i = rec[i]
                trajs[i] = {
                    "states": np.stack(r_i["states"] + [final]),
                    "rtg": np.array(r_i["rtg"] + [rtg_now[i]]),
                    "actions": np.stack(r_i["actions"] + [np.zeros(A, np.float32)]),
                    "rewards": np.array(r_i["rewards"], np.float32),
                    "var": np.array(r_i["var"]),
                    "terminated": bool(term),
                    "return": float(np.sum(r_i["rewards"])),
                }
    return trajs


def evaluate(model, envs, meta, seed, device) -> tuple[float, float]:
    """(normalised score, mean return) of tanh(mean) episodes from `eval_seeds`, at --eval-rtg and --eval-context-len."""
    seeds, meta = eval_seeds(seed, len(envs)), {**meta, "context_len": meta["eval_context_len"]}
    trajs = run_episodes(model, envs, seeds=seeds, target_rtg=meta["eval_rtg"], meta=meta, device=device, deterministic=True)
    rets = np.array([t["return"] for t in trajs])
    return float(np.mean(100.0 * (rets - meta["ref_min"]) / (meta["ref_max"] - meta["ref_min"]))), float(rets.mean())


def flatten_replay(trajs, reward_scale, reward_shift) -> dict:
    """The critic's replay as flat arrays: each trajectory's T+1 rows (states, RTG tokens, actions) back to back, and
    per transition its row, its trajectory's first row, the critic's reward and whether it ends the episode by
    termination (the last step of a terminated trajectory; a truncated one bootstraps from its final observation)."""
    lengths = np.array([len(t["rewards"]) for t in trajs])
    firsts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    flat = {k: np.concatenate([t[k] for t in trajs]).astype(np.float32) for k in ("states", "rtg", "actions")}
    flat["row"] = np.concatenate([f + np.arange(n) for f, n in zip(firsts, lengths)])
    flat["first"] = np.repeat(firsts, lengths)
    flat["r"] = np.concatenate([(t["rewards"] - reward_shift) * reward_scale for t in trajs]).astype(np.float32)
    flat["term"] = np.concatenate([(np.arange(n) == n - 1) & t["terminated"] for n, t in zip(lengths, trajs)])
    return flat


@torch.no_grad()
def critic_batch(flat: dict, idx, model, c: int, device) -> dict:
    """Transitions `idx` of the flat replay as tensors, with the target action a2 for s_{t+1}: tanh(mean) of the
    current DT on the shifted context (a target actor hard-updated per iteration: the DT moves slowly at lr 1e-5, so
    this replaces ODT+TD3's Polyak copy of the whole transformer)."""
    row = flat["row"][idx]
    batch = dict(s=flat["states"][row], a=flat["actions"][row], r=flat["r"][idx], s2=flat["states"][row + 1])
    batch = {k: torch.as_tensor(v, device=device) for k, v in {**batch, "term": flat["term"][idx]}.items()}
    ctx2 = [torch.as_tensor(x, device=device) for x in contexts(flat, row + 1, c, starts=flat["first"][idx])]
    batch["a2"] = torch.tanh(policy_head(model, ctx2)[0])
    return batch


def train_critic(run, args: Args, meta: dict, n_updates: int) -> dict:
    """n_updates TD3 steps on uniform minibatches of the critic's replay: target policy smoothing, then a Polyak step
    of the targets."""
    flat = flatten_replay(run.replay.trajs, reward_scale=meta["reward_scale"], reward_shift=meta["reward_shift"])
    device = next(run.model.parameters()).device
    stats = {"losses/critic_loss": [], "losses/q_values": []}
    for _ in range(n_updates):
        idx = run.rng.integers(len(flat["r"]), size=args.critic_batch_size)
        batch = critic_batch(flat, idx, run.model, args.c_online, device)
        with torch.no_grad():
            noise = (torch.randn_like(batch["a2"]) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
            next_q1, next_q2 = run.critic_target(batch["s2"], (batch["a2"] + noise).clamp(-1, 1))
            target = td_target(batch["r"], batch["term"], next_q1, next_q2, gamma=args.gamma)
        q1, q2 = run.critic(batch["s"], batch["a"])
        loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        check_finite("critic loss", loss)
        run.critic_opt.zero_grad()
        loss.backward()
        run.critic_opt.step()
        with torch.no_grad():
            for p, tp in zip(run.critic.parameters(), run.critic_target.parameters()):
                tp.lerp_(p, args.tau)
        stats["losses/critic_loss"].append(loss.item())
        stats["losses/q_values"].append(q1.mean().item())
    run.counters["critic_updates"] += n_updates
    run.counters["grad_updates"] += n_updates
    return stats


def pretrain_critic(run, ckpt: dict, args: Args, meta: dict, writer):
    """ODT+TD3's start of the online phase: the critic's replay seeded with the best offline trajectories, then
    --critic-pretrain-updates TD3 steps on it with the DT frozen (logged in chunks of 100 updates at steps 0, 100...)."""
    run.replay = TrajectoryBuffer(load_offline_trajectories(ckpt, meta), args.replay_size)
    if args.critic_pretrain_updates < 1:
        return
    t0 = time.time()
    stats = train_critic(run, args, meta, args.critic_pretrain_updates)
    for i in range(0, args.critic_pretrain_updates, 100):
        log_scalars(writer, i, {k.replace("losses/", "pretrain/"): v[i : i + 100] for k, v in stats.items()})
    loss, q = (np.mean(v[-100:]) for v in stats.values())
    took = f"{args.critic_pretrain_updates} updates in {time.time() - t0:.0f}s"
    tqdm.write(f"critic pretraining on {len(run.replay.trajs)} offline trajectories: {took}, loss {loss:.3f}, Q {q:.1f}")


def collect_candidates(run, args: Args, meta: dict) -> dict:
    """Lines 3-8: trajectories by length, K points each by action variance, G critic-scored actions per point; the
    actions outside Delta_r go to the sample buffer with their context, old log-prob and advantage."""
    device = next(run.model.parameters()).device
    ctx = sample_points(
        run.traj_buffer, n_trajectories=args.trajs_per_iter, k=args.reset_points, c=args.c_online, rng=run.rng, device=device
    )
    actions, old_log_probs, scores = q_guided_scores(
        run.model,
        run.critic,
        ctx,
        group_size=args.group_size,
        reward_scale=meta["reward_scale"],
        action_margin=meta["action_margin"],
        censor_bound=meta["censor_bound"],
    )
    adv, keep = group_advantages(scores, args.delta_r, args.delta_r_q)
    rows, cols = keep.nonzero(as_tuple=True)
    run.sample_buffer.push(
        rtg=ctx[0][rows],
        states=ctx[1][rows],
        ctx_actions=ctx[2][rows],
        mask=ctx[3][rows],
        action=actions[rows, cols],
        old_log_prob=old_log_probs[rows, cols],
        advantage=adv[rows, cols],
    )
    return {
        "losses/group_score_std": scores.std(dim=1, correction=0).mean().item(),
        "losses/kept_fraction": keep.float().mean().item(),
    }


def train_policy(run, args: Args, meta: dict) -> dict:
    """Line 9: --updates-per-iter steps of Eq. 3 - beta KL(pi || pi_ref) + kappa H, kappa a dual variable pushing the
    entropy towards -|A| (ODT's temperature); pi_ref is refreshed to the policy every --ref-update-every updates."""
    stats = {}
    for _ in range(args.updates_per_iter if len(run.sample_buffer) else 0):
        batch = run.sample_buffer.sample(args.n_batch, run.rng)
        likelihood = dict(action_margin=meta["action_margin"], censor_bound=meta["censor_bound"])
        terms = policy_objective(run.model, run.ref_model, batch, clip_coef=args.clip_coef, **likelihood)
        kappa = run.log_kappa.exp()
        loss = terms["pg_loss"] + args.kl_coef * terms["kl"] - kappa.detach() * terms["entropy"]
        check_finite("policy loss", loss)
        run.policy_opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        run.policy_opt.step()
        kappa_loss = kappa * (terms["entropy"] - meta["target_entropy"]).detach()
        run.kappa_opt.zero_grad()
        kappa_loss.backward()
        run.kappa_opt.step()
        run.counters["policy_updates"] += 1
        run.counters["grad_updates"] += 1
        if run.counters["policy_updates"] % args.ref_update_every == 0:
            run.ref_model.load_state_dict(run.model.state_dict())
        values = dict(
            policy_loss=terms["pg_loss"],
            ratio_mean=terms["ratio"].mean(),
            clipfrac=terms["clipfrac"],
            kl=terms["kl"],
            entropy=terms["entropy"],
            kappa=kappa,
        )
        for k, v in values.items():
            stats.setdefault(f"losses/{k}", []).append(v.item())
    return stats


# ---------------------------------------------------------------- run state
@dataclass
class Run:
    """What finetuning changes and --resume restores: the DT, pi_ref, the twin critics and their targets, log(kappa),
    the optimisers, both FIFO buffers, the critic's replay, the numpy RNG and the counters."""

    NETS = ("model", "ref_model", "critic", "critic_target", "policy_opt", "critic_opt", "kappa_opt")
    model: nn.Module
    ref_model: nn.Module
    critic: nn.Module
    critic_target: nn.Module
    log_kappa: torch.Tensor
    policy_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    kappa_opt: torch.optim.Optimizer
    traj_buffer: deque
    replay: TrajectoryBuffer
    sample_buffer: FifoBuffer
    rng: np.random.Generator
    counters: dict

    @classmethod
    def start(cls, model, args: Args, device):
        """pi_ref, fresh critics, kappa_initial and empty buffers around the loaded DT (pretrain_critic seeds the replay)."""
        state_dim, act_dim = model.embed_state.in_features, model.embed_action.in_features
        layer_norm = env_family(args.env_id)[0] != "mujoco"
        critic = TwinCritic(state_dim, act_dim, args.critic_hidden, layer_norm=layer_norm).to(device)
        log_kappa = torch.tensor(float(np.log(args.kappa_initial)), device=device, requires_grad=True)
        return cls(
            model=model,
            ref_model=copy.deepcopy(model).requires_grad_(False),
            critic=critic,
            critic_target=copy.deepcopy(critic).requires_grad_(False),
            log_kappa=log_kappa,
            policy_opt=Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay),
            critic_opt=torch.optim.AdamW(critic.parameters(), lr=args.critic_lr),
            kappa_opt=torch.optim.Adam([log_kappa], lr=args.kappa_lr),
            traj_buffer=deque(maxlen=args.full_buffer_size),
            replay=TrajectoryBuffer([], args.replay_size),
            sample_buffer=FifoBuffer(args.sample_buffer_size),
            rng=np.random.default_rng(args.seed),
            counters=dict(iteration=0, env_steps=0, grad_updates=0, critic_updates=0, policy_updates=0),
        )

    def save(self, path: Path, ckpt: dict, score: float, run_name: str, args: Args):
        """The finetuned checkpoint plus everything --resume needs to continue bit-exactly (every RNG included)."""
        finetune = {k: getattr(self, k).state_dict() for k in self.NETS}
        finetune.update(
            run_name=run_name,
            args=asdict(args),
            state=dict(self.counters),
            log_kappa=self.log_kappa.detach().cpu(),
            traj_buffer=list(self.traj_buffer),
            replay=self.replay.trajs,
            replay_next=self.replay.next,
            sample_buffer=self.sample_buffer.data,
            numpy_rng=self.rng.bit_generator.state,
            torch_rng=torch.get_rng_state(),
            python_rng=random.getstate(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        )
        save_atomic(path, {**finetuned_checkpoint(ckpt, self.model, score), "finetune": finetune})

    @torch.no_grad()
    def restore(self, finetune: dict, device):
        for k in self.NETS:
            getattr(self, k).load_state_dict(finetune[k])
        self.log_kappa.copy_(finetune["log_kappa"])
        self.traj_buffer.extend(finetune["traj_buffer"])
        self.replay.trajs, self.replay.next = finetune["replay"], finetune["replay_next"]
        self.sample_buffer.data = {k: v.to(device) for k, v in finetune["sample_buffer"].items()}
        self.counters.update(finetune["state"])
        self.rng.bit_generator.state = finetune["numpy_rng"]
        torch.set_rng_state(finetune["torch_rng"])
        random.setstate(finetune["python_rng"])
        if finetune["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(finetune["cuda_rng"])


def save_atomic(path: Path, payload: dict):
    """Write a temporary file, then rename it: a kill mid-save never leaves a truncated file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def finetuned_checkpoint(ckpt: dict, model, score: float) -> dict:
    """The finetuned DT as a format-1 checkpoint (loadable by load_model) with the pretrained metadata."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {**{k: v for k, v in ckpt.items() if k != "finetune"}, "state_dict": weights, "eval_normalized_score": score}


def load_start(args: Args, device):
    """(DT, checkpoint dict, rollout constants): the run state to resume, or the pretrained checkpoint; dims checked."""
    model, ckpt = load_model(args.resume or ensure_checkpoint(args), device)
    if args.resume and "finetune" not in ckpt:
        raise UserError(f"--resume {args.resume!r} is a pretrained checkpoint, not one written by --save-every")
    probe, cfg = make_env(args.env_id), ckpt["model_config"]
    dims = (probe.observation_space.shape[0], probe.action_space.shape[0])
    if (cfg["state_dim"], cfg["act_dim"]) != dims:
        raise UserError(
            f"checkpoint {ckpt['env_id']} has state/action dims ({cfg['state_dim']}, {cfg['act_dim']}) "
            f"but {args.env_id} has {dims}; pass a checkpoint pretrained for {args.env_id}"
        )
    family, key = env_family(args.env_id)
    meta = dict(
        context_len=args.c_online,
        rtg_scale=ckpt["rtg_scale"],
        state_mean=ckpt["state_mean"].numpy(),
        state_std=ckpt["state_std"].numpy(),
        eval_rtg=ckpt["eval_rtg"] if args.eval_rtg is None else args.eval_rtg,
        eval_context_len=args.eval_context_len,
        ref_min=ckpt["ref_min_score"],
        ref_max=ckpt["ref_max_score"],
        action_margin=ckpt.get("action_margin", 1e-6),
        censor_bound=ckpt.get("censor_bound"),
        target_entropy=-float(cfg["act_dim"]),
        reward_scale=REWARD_SCALE.get(key, 1.0),
        reward_shift=1.0 if family == "antmaze" else 0.0,
    )
    return model.eval(), ckpt, meta


def seed_everything(args: Args) -> torch.device:
    """Seeds, determinism, torch threads and the malloc fix; the device to run on."""
    fix_malloc_mmap_threshold()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


@contextmanager
def stop_on_non_finite(counters: dict, state_path: Path):
    """Turn a NonFinite into a one-line UserError; the state file still holds the last good iteration."""
    try:
        yield
    except NonFinite as e:
        kept = f"last good state kept at {state_path}" if state_path.is_file() else "no state saved yet"
        raise UserError(f"non-finite {e} at iteration {counters['iteration']}; stopped, {kept}") from None


def make_writer(args: Args, run_name: str) -> SummaryWriter:
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            config=vars(args),
            name=run_name,
            sync_tensorboard=True,
            save_code=True,
        )
    writer = SummaryWriter(f"{args.runs_dir}/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


def log_scalars(writer, step: int, stats: dict):
    """Lists are averaged, and skipped when empty."""
    for tag, value in stats.items():
        if not isinstance(value, list) or value:
            writer.add_scalar(tag, np.mean(value), step)


def log_evaluation(writer, step: int, score: float, eval_return: float, counters: dict, **extra):
    charts = dict(
        normalized_score=score,
        eval_return=eval_return,
        env_steps=counters["env_steps"],
        grad_updates=counters["grad_updates"],
        **extra,
    )
    log_scalars(writer, step, {f"charts/{k}": v for k, v in charts.items()})


def out_of_budget(args: Args, env_steps: int, start_time: float) -> bool:
    return bool(
        (args.total_env_steps and env_steps >= args.total_env_steps)
        or (args.max_seconds and time.time() - start_time >= args.max_seconds)
    )


# ---------------------------------------------------------------- main
def main(args: Args) -> float:
    start_time = time.time()  # --max-seconds counts from here, loading included
    args = apply_presets(resumed_args(args, RUN_CONTROL))
    device = seed_everything(args)

    # Start: the pretrained DT (or the run to resume) with dropout off; pi_ref, fresh critics, kappa, empty buffers
    model, ckpt, meta = load_start(args, device)
    run = Run.start(model, args, device)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.resume:  # the resumed run goes on in its own run directory
        run.restore(ckpt["finetune"], device)
        run_name = ckpt["finetune"]["run_name"]
    counters = run.counters
    writer = make_writer(args, run_name)
    train_envs, eval_envs = make_envs(args, run_name)
    state_path = Path(args.save_path or f"{args.runs_dir}/{run_name}/state.pt")
    if args.save_every:
        print(f"run state: {state_path} (continue with --resume {state_path})", flush=True)

    with stop_on_non_finite(counters, state_path):
        # Iteration 0: the loaded checkpoint, before any update
        score = ckpt["eval_normalized_score"]
        if not args.resume:
            score, eval_return = evaluate(model, eval_envs, meta, args.seed, device)
            log_evaluation(writer, 0, score, eval_return, counters)
            tqdm.write(f"iteration 0: normalized score {score:.1f} (loaded checkpoint)")
            # ALGO LOGIC: the critic's replay seeded with the best offline trajectories; the critic pretrained on it
            if args.num_iterations > 0:
                pretrain_critic(run, ckpt, args, meta, writer)
        t_loop, start_steps = time.time(), counters["env_steps"]
        pbar = tqdm(range(counters["iteration"] + 1, args.num_iterations + 1), desc="grpo-dt-qguided", mininterval=2.0)
        for iteration in pbar:
            counters["iteration"] = iteration
            # ALGO LOGIC line 2: full trajectories conditioned on g_online, sampled actions, no relabeling; FIFO buffer
            seeds = train_seeds(run.rng, len(train_envs))
            trajs = run_episodes(
                model, train_envs, seeds=seeds, target_rtg=args.g_online, meta=meta, device=device, deterministic=False
            )
            run.traj_buffer.extend(trajs)
            for traj in trajs:  # the critic's replay: the worst offline trajectories go first, then the oldest
                run.replay.add(traj)
            counters["env_steps"] += sum(len(t["rewards"]) for t in trajs)
            writer.add_scalar("charts/episodic_return", np.mean([t["return"] for t in trajs]), iteration)

            # ALGO LOGIC: Q_phi by TD3 on the replay (twin critics, target nets, truncation bootstraps)
            log_scalars(writer, iteration, train_critic(run, args, meta, args.critic_updates))

            # ALGO LOGIC lines 3-8: G critic-scored candidate actions at K actively sampled points per trajectory
            if counters["critic_updates"] >= args.critic_warmup_updates:
                log_scalars(writer, iteration, collect_candidates(run, args, meta))

            # ALGO LOGIC line 9: Eq. 3 with per-action ratios, - beta KL(pi || pi_ref), + kappa H
            log_scalars(writer, iteration, train_policy(run, args, meta))

            # Evaluate, log, save, budgets
            score, eval_return = evaluate(model, eval_envs, meta, args.seed, device)
            sps = int((counters["env_steps"] - start_steps) / max(time.time() - t_loop, 1e-9))
            log_evaluation(writer, iteration, score, eval_return, counters, SPS=sps)
            pbar.set_postfix(score=f"{score:.1f}", steps=counters["env_steps"], buf=len(run.sample_buffer))
            stop = out_of_budget(args, counters["env_steps"], start_time)
            if args.save_every and (iteration % args.save_every == 0 or iteration == args.num_iterations or stop):
                run.save(state_path, ckpt, score, run_name, args)
            if stop:
                tqdm.write(f"budget reached after iteration {iteration} ({counters['env_steps']} env steps)")
                break
    if args.save_model:
        save_atomic(Path(args.runs_dir) / run_name / f"{args.exp_name}.pt", finetuned_checkpoint(ckpt, model, score))
    writer.close()
    return score


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
