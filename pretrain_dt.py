"""Offline Decision Transformer pretraining with ODT's objective; writes the checkpoint every finetuning script starts from.

Luo & Zhu, "Online Finetuning Decision Transformers with Pure RL Gradients", Sec. 2, 4.1, App. A, Table 5: the NLL of
dataset actions under a tanh-squashed Gaussian minus temperature x entropy, the temperature a dual variable (target -dim(A)).
`--arch reinformer` pretrains a Reinformer (Zhuang et al., 2024) instead, the model of the paper's Fig. 4a.

    python pretrain_dt.py --env-id Hopper-v4 --dataset medium --scale cpu
"""

import contextlib
import ctypes
import math
import os
import random
import socket
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
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
    arch: Literal["dt", "reinformer"] = "dt"  # dt, or reinformer: tokens (s, R, a), R predicted from s by expectile loss
    expectile: float = 0.99  # Reinformer: tau of the expectile loss on its return-to-go prediction
    scale: Literal["paper", "cpu"] = "paper"  # unset size/schedule flags: paper (Table 5, 4x512) or cpu (128x2)
    random_steps: int = 1_000_000  # env steps of the random policy that makes `--dataset random` if missing
    checkpoint: Optional[str] = None  # output; default checkpoints/{env}__{dataset}__s{seed}[__cpu].pt
    num_updates: Optional[int] = None  # gradient updates (paper: 5000, ODT's; cpu: 3000)
    batch_size: Optional[int] = None  # trajectory segments per update (paper: 256; cpu: 32)
    learning_rate: Optional[float] = None  # peak LAMB learning rate (paper: 1e-4; cpu: 1e-3)
    warmup_updates: Optional[int] = None  # updates of linear learning-rate warm-up (paper: 1000; cpu: 150)
    anneal_lr: bool = False  # after warm-up, cosine-anneal the lr to 0 (ODT and the paper: constant)
    context_len: Optional[int] = None  # c_offline, training context (Table 6: 20 MuJoCo, 5 Adroit; cpu: 10)
    embed_dim: Optional[int] = None  # transformer width (paper: 512; cpu: 128)
    n_layers: Optional[int] = None  # transformer blocks (paper: 4; cpu: 2)
    n_heads: Optional[int] = None  # attention heads (paper: 4; cpu: 1)
    weight_decay: float = 1e-4  # LAMB weight decay
    max_grad_norm: float = 0.5  # global gradient-norm clip
    dropout: float = 0.1  # dropout in pretraining (the finetuning scripts switch it off)
    log_std_min: float = -5.0  # lower bound of the pre-tanh log-std
    log_std_max: float = 2.0  # upper bound of the pre-tanh log-std
    action_margin: float = 1e-6  # dataset actions clamped to +-(1 - margin) for the likelihood (ODT: 1e-6)
    censor_bound: Optional[float] = 0.99  # score actions on +-1 as P(|tanh(u)| > this); None: ODT's density
    init_temperature: float = 0.1  # initial entropy temperature
    temperature_lr: float = 1e-4  # Adam learning rate of the log-temperature
    rtg_scale: Optional[float] = None  # multiplier on return-to-go tokens (default: 1e-3 for MuJoCo and Adroit, 1 for AntMaze)
    eval_rtg: Optional[float] = None  # RTG that conditions evaluation (default ODT's, e.g. 3600 for Hopper)
    eval_context_len: Optional[int] = None  # evaluation context (default Table 6's c_online)
    eval_every: int = 1000  # evaluate every this many updates and at the end (0: only at the end)
    eval_episodes: int = 10  # deterministic evaluation episodes, stepped as one batch
    save_every: int = 1000  # save the checkpoint every this many updates (0: never)


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


# ---- shared: datasets (identical in pretrain_dt.py and iql.py; tests/test_shared_blocks.py) ----
# D4RL reference returns (min, max) for D4RL files and generated sets; Minari sets carry their own.
D4RL_REF = dict(hopper=(-20.272305, 3234.3), walker2d=(1.629008, 4592.3), halfcheetah=(-280.178953, 12135.0))
D4RL_REF.update(ant=(-325.6, 3879.7), door=(-56.512833, 2880.5693087298737), hammer=(-274.856578, 12794.134825156867))
D4RL_REF.update(pen=(96.262799, 3076.8331017826877), antmaze=(0.0, 1.0))
# The return that conditions evaluation rollouts, raw reward units (ODT, Table 6).
TARGET_RETURNS = dict(hopper=3600, walker2d=5000, ant=6000, halfcheetah=6000, door=3000, hammer=4000, pen=6000, antmaze=1)
# Paper short names -> Minari ids; None: Minari has no such set (pass the D4RL file with --dataset-path).
SHORT_NAMES = {
    "mujoco": {
        "medium": "mujoco/{key}/medium-v0",
        "expert": "mujoco/{key}/expert-v0",
        "random": "generated/{key}/random-v0",
        "medium-replay": None,
    },
    "adroit": {n: "D4RL/{key}/" + n + "-v2" for n in ("human", "cloned", "expert")},
    "antmaze": {"umaze": "D4RL/antmaze/umaze-v1", "umaze-diverse": "D4RL/antmaze/umaze-diverse-v1"},
}


def remote_reachable(timeout: float = 3.0) -> bool:
    """Can Minari's remote be reached? Asked in a thread, so an offline machine answers in `timeout` s."""
    ok = []

    def connect():
        with contextlib.suppress(OSError):
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            ok.append(True)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(ok)


def episodes_to_trajectories(episodes, antmaze: bool) -> list[dict]:
    trajs = []
    for ep in episodes:
        obs = flatten_antmaze_obs(ep.observations) if antmaze else ep.observations
        traj = {
            k: np.asarray(v, np.float32)
            for k, v in dict(observations=obs[:-1], actions=ep.actions, rewards=ep.rewards).items()
        }
        trajs.append({**traj, "terminals": np.asarray(ep.terminations, bool)})
    return trajs


def load_d4rl_hdf5(path: str) -> list[dict]:
    """The episodes of a D4RL file; an episode ends at a terminal or a timeout."""
    import h5py

    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    try:
        with h5py.File(path, "r") as f:
            data = {k: f[k][()] for k in keys}
    except (OSError, KeyError) as e:
        raise UserError(f"--dataset-path {path!r} is not a D4RL HDF5 file with keys {keys} ({e})") from None
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    if len(ends) == 0 or ends[-1] != len(data["rewards"]):
        ends = np.append(ends, len(data["rewards"]))  # the file's last, unfinished episode
    dtypes = dict(observations=np.float32, actions=np.float32, rewards=np.float32, terminals=bool)
    return [{k: data[k][s:e].astype(t) for k, t in dtypes.items()} for s, e in zip([0, *ends[:-1]], ends)]


def generate_random_dataset(dataset_id: str, env_id: str, key: str, steps: int, seed: int):
    """A uniform-random-policy Minari dataset (whole-array episodes: `EpisodeBuffer.add_step_data` pulls in jax)."""
    import minari
    from minari.data_collector import EpisodeBuffer

    env = make_env(env_id)
    env.action_space.seed(seed)
    buffers, obs, rew, term, trunc, acts = [], [env.reset(seed=seed)[0]], [], [], [], []
    for step in tqdm(range(steps), desc=f"generating {dataset_id}"):
        acts.append(env.action_space.sample())
        o, r, te, tr, _ = env.step(acts[-1])
        obs.append(o)
        rew.append(float(r))
        term.append(bool(te))
        trunc.append(bool(tr or step == steps - 1))
        if te or trunc[-1]:
            episode = dict(observations=np.array(obs), actions=np.array(acts), rewards=rew, terminations=term)
            buffers.append(EpisodeBuffer(**episode, truncations=trunc, infos={}))
            obs, rew, term, trunc, acts = [env.reset()[0]], [], [], [], []
    ref_min, ref_max = D4RL_REF[key]
    info = dict(algorithm_name="uniform random policy", description=f"{steps} steps of a uniform random policy in {env_id}")
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env=env_id, ref_min_score=ref_min, ref_max_score=ref_max, **info
    )


def minari_trajectories(env_id: str, dataset: str, random_steps: int, seed: int):
    """(dataset_id, trajectories, (ref_min, ref_max)) from the local Minari cache, made or downloaded if missing."""
    import minari

    family, key = env_family(env_id)
    names = SHORT_NAMES[family]
    if dataset in names and names[dataset] is None:
        raise UserError(f"Minari has no {dataset!r} set for {env_id}; pass the D4RL file with --dataset-path")
    if dataset not in names and "/" not in dataset:
        raise UserError(
            f"unknown --dataset {dataset!r}; use one of {sorted(names)} or a Minari id like local/hopper/medium-v0"
        )
    dataset_id, local = names[dataset].format(key=key) if dataset in names else dataset, minari.list_local_datasets()
    if dataset_id not in local:
        if dataset_id == f"generated/{key}/random-v0":
            generate_random_dataset(dataset_id, env_id, key, random_steps, seed)
        elif dataset_id.startswith("generated/") or not remote_reachable():
            root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
            raise UserError(
                f"dataset {dataset_id!r} is not in {root} (it has {sorted(local) or 'none'}) and cannot be downloaded"
            )
        else:
            minari.download_dataset(dataset_id)
    ds = minari.load_dataset(dataset_id)
    md = ds.storage.metadata
    ref = (md["ref_min_score"], md["ref_max_score"]) if "ref_max_score" in md else D4RL_REF[key]
    return dataset_id, episodes_to_trajectories(ds.iterate_episodes(), antmaze=family == "antmaze"), ref


def load_dataset(env_id: str, dataset: str, dataset_path: Optional[str], random_steps: int, seed: int):
    """(dataset_id, trajectories, ref_min, ref_max) of --dataset-path if given, else of the Minari set --dataset."""
    family, key = env_family(env_id)
    if dataset_path is None:
        dataset_id, trajs, ref = minari_trajectories(env_id, dataset, random_steps, seed)
    else:
        dataset_id = dataset if "/" in dataset else f"d4rl/{Path(dataset_path).stem}"
        trajs, ref = load_d4rl_hdf5(dataset_path), D4RL_REF[key]
    if family == "antmaze":
        trajs = [t for t in trajs if len(t["rewards"]) > 1]  # the paper drops 1-step trajectories (App. A)
    return dataset_id, trajs, float(ref[0]), float(ref[1])


def normalized_score(ret, ref_min: float, ref_max: float):
    return 100.0 * (np.asarray(ret) - ref_min) / (ref_max - ref_min)  # D4RL's, as `minari.get_normalized_score`


# ---- end shared: datasets ----


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


SCALES = {  # --scale presets: Table 5's DT with ODT's schedule (for a GPU), and a DT for one CPU core
    "paper": dict(embed_dim=512, n_layers=4, n_heads=4, context_len=None, batch_size=256, learning_rate=1e-4),
    "cpu": dict(embed_dim=128, n_layers=2, n_heads=1, context_len=10, batch_size=32, learning_rate=1e-3),
}
SCALES["paper"].update(warmup_updates=1000, num_updates=5000)
SCALES["cpu"].update(warmup_updates=150, num_updates=3000)


def check(args: Args) -> Args:
    """The size and schedule flags left unset take SCALES[--scale]; an input that breaks a run is a one-line error."""
    args = replace(args, **{k: v for k, v in SCALES[args.scale].items() if getattr(args, k) is None})
    positive = "num_updates batch_size context_len embed_dim n_layers n_heads eval_episodes eval_context_len random_steps"
    positive += " learning_rate max_grad_norm init_temperature temperature_lr rtg_scale"
    nonnegative = "warmup_updates eval_every save_every weight_decay"
    check_args(args, positive=positive.split(), nonnegative=nonnegative.split(), unit=["dropout", "expectile"])
    if args.embed_dim % args.n_heads:
        raise UserError(f"--embed-dim {args.embed_dim} is not divisible by --n-heads {args.n_heads}")
    for flag, value in (("--action-margin", args.action_margin), ("--censor-bound", args.censor_bound)):
        if value is not None and not 0 < value < 1:
            raise UserError(f"{flag} must be in (0, 1), got {value}")
    return args


def default_contexts(family: str, key: str, dataset: str) -> tuple[int, int]:
    """(c_offline, c_online) of Table 6."""
    antmaze = (1, 5) if "diverse" in dataset else (5, 1)
    return dict(mujoco=(20, 1), adroit=(5, 5 if key == "hammer" else 1), antmaze=antmaze)[family]


class SegmentSampler:
    """Segments of `context_len` steps: trajectories drawn in proportion to length, start uniform, left padding."""

    def __init__(self, trajs, context_len, state_mean, state_std, rtg_scale, rng):
        self.K, self.rng, self.lengths = context_len, rng, np.array([len(t["rewards"]) for t in trajs])
        self.offsets = np.cumsum(self.lengths) - self.lengths
        rtg = np.concatenate([np.cumsum(t["rewards"][::-1])[::-1] for t in trajs])  # return-to-go, undiscounted
        self.rtg = (rtg.astype(np.float64) * rtg_scale).astype(np.float32)[:, None]
        self.states = (np.concatenate([t["observations"] for t in trajs]) - state_mean) / state_std
        self.actions = np.concatenate([t["actions"] for t in trajs])

    def sample(self, batch_size):
        idx = self.rng.choice(len(self.lengths), size=batch_size, p=self.lengths / self.lengths.sum())
        start = (self.rng.random(batch_size) * self.lengths[idx]).astype(np.int64)
        pad = self.K - np.minimum(self.K, self.lengths[idx] - start)
        mask = np.arange(self.K) >= pad[:, None]
        src = self.offsets[idx, None] + start[:, None] + np.where(mask, np.arange(self.K) - pad[:, None], 0)
        return *(np.where(mask[..., None], x[src], 0.0) for x in (self.rtg, self.states, self.actions)), mask


def dt_loss(model, log_temperature, target_entropy, rtg, states, actions, mask, margin=1e-6, censor_bound=None):
    """ODT's loss (masked NLL - temperature x entropy, + a Reinformer's RTG loss), the temperature's dual loss, the NLL,
    the entropy (and the RTG loss)."""
    mean, log_std, *rtg_hat = model(rtg, states, actions, mask)
    nll = -action_log_prob(mean, log_std, actions, margin, censor_bound)
    dist, m = squashed_gaussian(mean, log_std), mask.float()
    entropy = -dist.log_prob(dist.rsample())  # single-sample estimate: tanh-Gaussian has no closed form
    nll, entropy = ((x * m).sum() / m.sum() for x in (nll, entropy))
    rtg_loss = [expectile_loss(r[..., 0], rtg[..., 0], mask, model.expectile) for r in rtg_hat]  # a Reinformer's
    temperature = log_temperature.exp()
    loss = nll - temperature.detach() * entropy + sum(rtg_loss)
    return loss, temperature * (entropy - target_entropy).detach(), nll, entropy, *rtg_loss


@torch.no_grad()
def evaluate(model, envs, meta, seeds, device):
    """(returns, lengths) of deterministic tanh(mean) episodes stepped in lockstep; meta: context_len, state_mean/std,
    rtg_scale, eval_rtg."""
    model.eval()
    obs = np.stack([env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds)])
    n, K, A = len(obs), meta["context_len"], envs[0].action_space.shape[0]
    mean_t, std_t = (torch.as_tensor(meta[k], device=device) for k in ("state_mean", "state_std"))
    states, actions, rtg = (torch.zeros(n, K, d, device=device) for d in (obs.shape[1], A, 1))
    mask = torch.zeros(n, K, dtype=torch.bool, device=device)
    target = torch.full((n,), meta["eval_rtg"] * meta["rtg_scale"], device=device)
    returns, lengths, alive = np.zeros(n), np.zeros(n, dtype=int), np.ones(n, dtype=bool)
    while alive.any():
        # Shift the context one step left and write the newest state and RTG in the last slot.
        states, actions, rtg, mask = (x.roll(-1, dims=1) for x in (states, actions, rtg, mask))
        states[:, -1] = (torch.as_tensor(obs, dtype=torch.float32, device=device) - mean_t) / std_t
        rtg[:, -1, 0], actions[:, -1], mask[:, -1] = target, 0.0, True
        if isinstance(model, Reinformer):  # it acts on the return-to-go it predicts from the state
            rtg[:, -1] = model(rtg, states, actions, mask)[2][:, -1]
        actions[:, -1] = torch.tanh(model(rtg, states, actions, mask)[0][:, -1])
        act_np = actions[:, -1].cpu().numpy()
        for i in np.flatnonzero(alive):
            obs[i], r, term, trunc, _ = envs[i].step(act_np[i])
            returns[i], target[i], alive[i] = returns[i] + r, target[i] - r * meta["rtg_scale"], not (term or trunc)
            lengths[i] += 1
    model.train()
    return returns, lengths


def lr_factor(update: int, args: Args) -> float:
    """The learning rate of update `update` over its peak: linear warm-up, then constant or (--anneal-lr) a half cosine."""
    if update < args.warmup_updates or not args.anneal_lr:
        return min(1.0, update / max(1, args.warmup_updates))
    return 0.5 * (1 + math.cos(math.pi * (update - args.warmup_updates) / max(1, args.num_updates - args.warmup_updates)))


def main(args: Args):
    args = check(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device = seed_everything(args)
    family, key = env_family(args.env_id)
    dataset_id, trajs, ref_min, ref_max = load_dataset(
        args.env_id, args.dataset, args.dataset_path, args.random_steps, args.seed
    )
    video = "rgb_array" if args.capture_video else None  # the first evaluation env records
    eval_envs = [make_env(args.env_id, render_mode=video if i == 0 else None) for i in range(args.eval_episodes)]
    dims = eval_envs[0].observation_space.shape + eval_envs[0].action_space.shape
    data_dims = trajs[0]["observations"].shape[1:] + trajs[0]["actions"].shape[1:]
    if data_dims != dims:
        raise UserError(f"dataset {dataset_id} has obs/action dims {data_dims} but {args.env_id} has {dims}")
    obs = np.concatenate([t["observations"] for t in trajs])
    per_step = sum(t["rewards"].sum() for t in trajs) / len(obs)  # what a moving policy earns, against its evaluations
    print(f"{dataset_id}: {len(trajs)} trajectories, {len(obs)} steps, {per_step:.2f} reward per step")
    state_mean, state_std = obs.mean(0), obs.std(0) + 1e-6
    c_offline, c_online = default_contexts(family, key, dataset_id)
    c_offline, c_online = args.context_len or c_offline, args.eval_context_len or c_online
    rtg_scale = args.rtg_scale or (1.0 if family == "antmaze" else 1e-3)
    eval_rtg = float(args.eval_rtg if args.eval_rtg is not None else TARGET_RETURNS[key])
    model_keys = ("embed_dim", "n_layers", "n_heads", "dropout", "log_std_min", "log_std_max")
    model_config = dict(state_dim=dims[0], act_dim=dims[1], **{k: getattr(args, k) for k in model_keys})
    reinformer = dict(arch="reinformer", expectile=args.expectile) if args.arch == "reinformer" else {}  # a DT names none
    # The checkpoint's fixed entries; the weights and what was learned join them at each save.
    ckpt = dict(format_version=CHECKPOINT_FORMAT_VERSION, env_id=args.env_id, dataset_id=dataset_id, ref_min_score=ref_min)
    ckpt.update(ref_max_score=ref_max, rtg_scale=rtg_scale, eval_rtg=eval_rtg, eval_context_len=c_online)
    ckpt.update(model_config={**model_config, **reinformer, "activation": "silu", "c_offline": c_offline})
    ckpt.update(state_mean=torch.as_tensor(state_mean), state_std=torch.as_tensor(state_std), target_entropy=-float(dims[1]))
    ckpt.update(action_margin=args.action_margin, censor_bound=args.censor_bound, pretrain_args=asdict(args))
    meta = {**ckpt, "context_len": c_online}  # what `evaluate` reads
    sampler = SegmentSampler(trajs, c_offline, state_mean, state_std, rtg_scale, np.random.default_rng(args.seed))
    final_path = Path(args.checkpoint or default_checkpoint_path(args.env_id, args.dataset, args.seed, args.scale))
    run_path = Path(args.runs_dir) / run_name / "checkpoint.pt"  # so final_path never holds a half-trained model

    model = Reinformer(**model_config, expectile=args.expectile) if reinformer else DecisionTransformer(**model_config)
    model = model.to(device)
    log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    optimizer = Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u + 1, args))
    temperature_opt = torch.optim.Adam([log_temperature], lr=args.temperature_lr)
    writer = make_writer(args, run_name)
    if args.capture_video:
        eval_envs[0] = gym.wrappers.RecordVideo(eval_envs[0], f"videos/{run_name}")

    def payload(update):
        learned = dict(log_temperature=log_temperature.item(), num_updates=update, eval_normalized_score=score)
        return dict(ckpt, state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, **learned)

    # ALGO LOGIC: ODT's pretraining, NLL - temperature x entropy, the temperature a dual variable
    score, start = float("nan"), time.time()
    pbar = tqdm(range(1, args.num_updates + 1), desc="pretrain", mininterval=2.0)
    for update in pbar:
        batch = (torch.as_tensor(x, device=device) for x in sampler.sample(args.batch_size))
        loss, temperature_loss, nll, entropy, *rtg_loss = dt_loss(
            model, log_temperature, ckpt["target_entropy"], *batch, margin=args.action_margin, censor_bound=args.censor_bound
        )
        if not torch.isfinite(loss):
            raise UserError(f"non-finite loss at update {update}; stopped without writing {final_path}")
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        warmup.step()
        temperature_opt.zero_grad()
        temperature_loss.backward()
        temperature_opt.step()

        last, logs = update == args.num_updates, {}
        if update % 100 == 0 or last:
            logs = {"losses/nll": nll, "losses/loss": loss, "losses/entropy": entropy}
            logs.update({"losses/rtg_loss": r for r in rtg_loss})
            logs.update({"losses/temperature": log_temperature.exp(), "charts/learning_rate": warmup.get_last_lr()[0]})
            logs["charts/updates_per_s"] = update / (time.time() - start)
            pbar.set_postfix(nll=f"{nll.item():.3f}", ent=f"{entropy.item():.2f}")
        if last or (args.eval_every and update % args.eval_every == 0):
            returns, lengths = evaluate(model, eval_envs, meta, eval_seeds(args.seed, args.eval_episodes), device)
            score = float(normalized_score(returns, ref_min, ref_max).mean())
            logs.update({"charts/episodic_return": returns.mean(), "charts/normalized_score": score})
            logs["charts/episodic_length"] = lengths.mean()  # a policy that stands still to the time limit shows here
            tqdm.write(
                f"update {update}: return {returns.mean():.1f} +- {returns.std():.1f}, length {lengths.mean():.0f},"
                f" {returns.sum() / lengths.sum():.2f}/step, normalized score {score:.1f}"
            )
        for tag, value in logs.items():
            writer.add_scalar(tag, value, update)
        if args.save_every and update % args.save_every == 0:
            save_atomic(run_path, payload(update))
    writer.close()
    save_atomic(final_path, payload(args.num_updates))
    print(f"checkpoint: {final_path} (normalized score {score:.1f})")
    return final_path, score, model


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
