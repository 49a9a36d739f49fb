"""Offline Decision Transformer pretraining on Minari data; writes the checkpoint every finetuning script loads.

Paper: "Online Finetuning Decision Transformers with Pure RL Gradients" (Luo & Zhu), Section 2 (DT / ODT
preliminaries), Section 4.1, Appendix A and Table 5. The objective is ODT's: the NLL of dataset actions under a
tanh-squashed Gaussian, plus an entropy bonus whose temperature is a dual variable pushed toward the target entropy
-dim(A).

Example (offline, on the shared data; `--model-size cpu` for the README's CPU config):
    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) \
        python pretrain_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0
"""

import ctypes
import math
import os
import random
import socket
import sys
import threading
import time
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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


# ---------------------------------------------------------------- args
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
    model_size: Literal["paper", "cpu"] = "paper"
    """preset of the size and schedule flags below (MODEL_SIZES; a flag given explicitly wins): paper is Table 5's
    4x512 DT (meant for a GPU), cpu the README's 128x2 DT (~10 min on one core); also names the default checkpoint"""
    random_steps: int = 1_000_000
    """env steps of the uniform random policy when `--dataset random` has to be generated locally"""
    checkpoint: Optional[str] = None
    """where to write the checkpoint; default `checkpoints/{env_id}__{dataset}__s{seed}.pt` (`__cpu.pt` for cpu)"""

    num_updates: Optional[int] = None
    """gradient updates of pretraining (paper: 5000, ODT's hopper setting; cpu: 3000)"""
    batch_size: Optional[int] = None
    """trajectory segments per update (paper: 256; cpu: 32)"""
    learning_rate: Optional[float] = None
    """peak LAMB learning rate (paper: 1e-4; cpu: 1e-3)"""
    warmup_updates: Optional[int] = None
    """updates of linear learning-rate warm-up (paper: 1000; cpu: 150)"""
    context_len: Optional[int] = None
    """c_offline, the training context (cpu: 10); paper: Table 6, 20 MuJoCo, 5 Adroit, 5 AntMaze umaze, 1 umaze-diverse"""
    embed_dim: Optional[int] = None
    """transformer embedding width (paper: 512, Table 5; cpu: 128)"""
    n_layers: Optional[int] = None
    """transformer blocks (paper: 4, Table 5; cpu: 2)"""
    n_heads: Optional[int] = None
    """attention heads (paper: 4, Table 5; cpu: 1)"""
    weight_decay: float = 1e-4
    """LAMB weight decay (Table 5)"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip (Table 5)"""
    dropout: float = 0.1
    """dropout in pretraining (Table 5); finetuning scripts switch it off"""
    log_std_min: float = -5.0
    """lower bound of the pre-tanh log-std"""
    log_std_max: float = 2.0
    """upper bound of the pre-tanh log-std"""
    action_margin: float = 1e-6
    """dataset actions are clamped to +-(1 - margin) before the likelihood (ODT: 1e-6, which puts an exact +-1 at
    atanh = +-7.25 in pre-tanh space); recorded in the checkpoint so finetuning log-probs use the same clamp"""
    censor_bound: Optional[float] = 0.99
    """score a dataset action dimension on +-1 as the point mass P(tanh(u) beyond +-censor_bound) instead of the
    density at the clamp point, which inflates sigma (ODT and the paper: `--censor-bound None`, the density; README,
    "Actions on the bounds"); recorded in the checkpoint for the finetuning log-probs"""
    action_mse_coef: float = 0.0
    """weight of the squared error of tanh(mean) against the dataset action, added to the NLL (ODT: 0)"""
    ema_decay: Optional[float] = None
    """evaluate and save an exponential moving average of the weights, decayed by this per update (torch's
    `AveragedModel`; e.g. 0.999); None (ODT): the weights as trained. An experiment of issue #17 (README)"""
    init_temperature: float = 0.1
    """initial entropy temperature (ODT)"""
    temperature_lr: float = 1e-4
    """Adam learning rate of the log-temperature dual variable (ODT)"""
    rtg_scale: Optional[float] = None
    """multiplier on return-to-go tokens; default 1e-3 for MuJoCo and Adroit, 1 for AntMaze"""
    eval_rtg: Optional[float] = None
    """target return that conditions evaluation rollouts; default per env (e.g. 3600 Hopper)"""
    eval_context_len: Optional[int] = None
    """context of evaluation rollouts; default c_online of Table 6 (5 Hammer and umaze-diverse, else 1), the context
    the finetuning scripts act with, so this score is their iteration-0 score"""
    eval_every: int = 1000
    """evaluate every this many updates (and at the end); 0 evaluates only at the end"""
    eval_episodes: int = 10
    """deterministic evaluation episodes, stepped as one batch"""
    save_every: int = 1000
    """write the checkpoint every this many updates (and at the end); 0 writes only at the end"""


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


# ---------------------------------------------------------------- datasets
# ---- shared: datasets (identical in pretrain_dt.py and iql.py; tests/test_shared_blocks.py) ----
# D4RL reference returns (REF_MIN, REF_MAX), used for D4RL HDF5 files and the generated random sets.
D4RL_REF = {
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "halfcheetah": (-280.178953, 12135.0),
    "ant": (-325.6, 3879.7),
    "door": (-56.512833, 2880.5693087298737),
    "hammer": (-274.856578, 12794.134825156867),
    "pen": (96.262799, 3076.8331017826877),
    "antmaze": (0.0, 1.0),
}
# The return that conditions evaluation rollouts (eval RTG) per env key, in raw reward units (ODT / Table 6).
TARGET_RETURNS = dict(hopper=3600, walker2d=5000, ant=6000, halfcheetah=6000, door=3000, hammer=4000, pen=6000, antmaze=1)
# Paper short names -> Minari ids per env family; None: Minari has no such set (pass the D4RL file).
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
    """Resolve and connect to Minari's remote host in a thread, so an offline machine answers in `timeout` s."""
    remote = os.getenv("MINARI_REMOTE", "hf://farama-minari")
    host = "huggingface.co" if remote.startswith("hf://") else "storage.googleapis.com"
    ok = []

    def connect():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(ok)


def episodes_to_trajectories(episodes, antmaze: bool) -> list[dict]:
    """Minari episodes as dicts of float32 observations (the final one dropped), actions, rewards; bool terminals."""
    trajs = []
    for ep in episodes:
        obs = flatten_antmaze_obs(ep.observations) if antmaze else ep.observations
        arrays = dict(observations=obs[:-1], actions=ep.actions, rewards=ep.rewards)
        traj = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
        trajs.append({**traj, "terminals": np.asarray(ep.terminations, bool)})
    return trajs


def load_d4rl_hdf5(path: str) -> list[dict]:
    """The episodes of a D4RL file, as `episodes_to_trajectories` gives them; an episode ends at a terminal or timeout."""
    import h5py

    if not Path(path).is_file():
        raise UserError(f"--dataset-path {path!r} is not a file")
    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    with h5py.File(path, "r") as f:
        missing = set(keys) - set(f.keys())
        if missing:
            raise UserError(f"{path} is not D4RL format: missing keys {sorted(missing)}")
        data = {k: f[k][()] for k in keys}
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    if len(ends) == 0 or ends[-1] != len(data["rewards"]):
        ends = np.append(ends, len(data["rewards"]))  # the file's last, unfinished episode
    dtypes = dict(observations=np.float32, actions=np.float32, rewards=np.float32, terminals=bool)
    return [{k: data[k][s:e].astype(t) for k, t in dtypes.items()} for s, e in zip([0, *ends[:-1]], ends)]


def generate_random_dataset(dataset_id: str, env_id: str, key: str, steps: int, seed: int):
    """A uniform-random-policy Minari dataset, written with `create_dataset_from_buffers`.

    Episodes are built as whole arrays: `EpisodeBuffer.add_step_data` would pull in jax.
    """
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


def load_dataset(env_id: str, dataset: str, dataset_path: Optional[str], random_steps: int, seed: int):
    """Resolve `--dataset` / `--dataset-path` to (dataset_id, trajectories, ref_min, ref_max).

    Order: D4RL file if given; else the paper short name or a Minari id, looked up in the local
    Minari cache, then Minari's remote; an unreachable remote is a clear error within 5 s.
    """
    family, key = env_family(env_id)
    if dataset_path is not None:
        trajs = load_d4rl_hdf5(dataset_path)
        ref = D4RL_REF[key]
        dataset_id = dataset if "/" in dataset else f"d4rl/{Path(dataset_path).stem}"
    else:
        import minari

        names = SHORT_NAMES[family]
        if dataset in names:
            if names[dataset] is None:
                raise UserError(f"Minari has no {dataset!r} set for {env_id}; pass the D4RL file with --dataset-path")
            dataset_id = names[dataset].format(key=key)
        elif "/" in dataset:
            dataset_id = dataset
        else:
            raise UserError(
                f"unknown --dataset {dataset!r} for {family}; use one of {sorted(names)} or a Minari id "
                "like local/hopper/medium-v0"
            )
        local = minari.list_local_datasets()
        if dataset_id not in local:
            made_here = f"generated/{key}/random-v0"  # the one set this script makes; other generated/ sets are
            if dataset_id == made_here:  # made by benchmarks/make_datasets.py and are on no remote
                generate_random_dataset(dataset_id, env_id, key, random_steps, seed)
            elif not dataset_id.startswith("generated/") and remote_reachable():
                minari.download_dataset(dataset_id)
            else:
                root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
                raise UserError(
                    f"dataset {dataset_id!r} is not in the local Minari cache ({root}) and cannot be downloaded or "
                    f"made here; local datasets: {sorted(local) or 'none'}. Set MINARI_DATASETS_PATH to a datasets "
                    f"root, pass a D4RL file with --dataset-path, or use --dataset random to generate {made_here}"
                )
        ds = minari.load_dataset(dataset_id)
        trajs = episodes_to_trajectories(ds.iterate_episodes(), antmaze=family == "antmaze")
        md = ds.storage.metadata
        ref = (md["ref_min_score"], md["ref_max_score"]) if "ref_max_score" in md else D4RL_REF[key]
    if family == "antmaze":
        trajs = [t for t in trajs if len(t["rewards"]) > 1]  # the paper drops 1-step trajectories (App. A)
    return dataset_id, trajs, float(ref[0]), float(ref[1])


def normalized_score(ret, ref_min: float, ref_max: float):
    """D4RL normalized score x100, the formula of `minari.get_normalized_score`."""
    return 100.0 * (np.asarray(ret) - ref_min) / (ref_max - ref_min)


# ---- end shared: datasets ----


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


# ---------------------------------------------------------------- algorithm pieces
def default_contexts(family: str, key: str, dataset: str) -> tuple[int, int]:
    """(c_offline, c_online) of Table 6; the rows differ only for Hammer and AntMaze umaze-diverse."""
    if family == "antmaze":
        return (1, 5) if "diverse" in dataset else (5, 1)
    if family == "adroit":
        return 5, 5 if key == "hammer" else 1
    return 20, 1


def discounted_suffix_sums(rewards: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """RTG g_t = sum_{k>=t} gamma^(k-t) r_k."""
    out, acc = np.zeros_like(rewards, dtype=np.float64), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        out[t] = acc
    return out


class SegmentSampler:
    """Segments of `context_len` steps: trajectories drawn in proportion to length, start uniform, left padding."""

    def __init__(self, trajs, context_len, state_mean, state_std, rtg_scale, rng):
        self.K, self.rng = context_len, rng
        self.lengths = np.array([len(t["rewards"]) for t in trajs])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.states = ((np.concatenate([t["observations"] for t in trajs]) - state_mean) / state_std).astype(np.float32)
        self.actions = np.concatenate([t["actions"] for t in trajs]).astype(np.float32)
        self.rtg = (np.concatenate([discounted_suffix_sums(t["rewards"]) for t in trajs]) * rtg_scale).astype(np.float32)

    def sample(self, batch_size):
        idx = self.rng.choice(len(self.lengths), size=batch_size, p=self.lengths / self.lengths.sum())
        start = (self.rng.random(batch_size) * self.lengths[idx]).astype(np.int64)
        pad = self.K - np.minimum(self.K, self.lengths[idx] - start)
        j = np.arange(self.K)[None, :]
        mask = j >= pad[:, None]
        src = self.offsets[idx, None] + start[:, None] + np.where(mask, j - pad[:, None], 0)
        rtg = np.where(mask, self.rtg[src], 0.0)[..., None]
        states = np.where(mask[..., None], self.states[src], 0.0)
        actions = np.where(mask[..., None], self.actions[src], 0.0)
        return rtg, states, actions, mask


def dt_loss(model, log_temperature, target_entropy, rtg, states, actions, mask, margin=1e-6, mse_coef=0.0, censor_bound=None):
    """ODT's loss: masked NLL of clamped dataset actions minus temperature x entropy (+ mse_coef x action MSE), and the
    temperature's dual loss; returns (loss, temperature_loss, nll, entropy, action_mse).

    The action MSE is the squared error of the evaluation action tanh(mean); with mse_coef 0 it is only logged: the
    batch NLL swings with how many boundary actions a batch holds (each exact +-1 adds log(2e-6) = -13 to it), it does not.
    """
    mean, log_std = model(rtg, states, actions, mask)
    nll = -action_log_prob(mean, log_std, actions, margin, censor_bound)
    dist = squashed_gaussian(mean, log_std)
    entropy = -dist.log_prob(dist.rsample())  # single-sample estimate: tanh-Gaussian has no closed form
    sq_err = ((torch.tanh(mean) - actions) ** 2).mean(-1)
    m = mask.float()
    nll, entropy, action_mse = ((x * m).sum() / m.sum() for x in (nll, entropy, sq_err))
    temperature = log_temperature.exp()
    loss = nll - temperature.detach() * entropy + mse_coef * action_mse
    temperature_loss = temperature * (entropy - target_entropy).detach()
    return loss, temperature_loss, nll, entropy, action_mse.detach()


@torch.no_grad()
def evaluate(model, envs, ckpt_like, seeds, device):
    """Deterministic (tanh(mean)) episodes, all envs stepped in lockstep with one batched forward per step; the returns.

    `ckpt_like` holds context_len, state_mean, state_std, rtg_scale and eval_rtg."""
    model.eval()
    K, S, A = ckpt_like["context_len"], len(ckpt_like["state_mean"]), envs[0].action_space.shape[0]
    mean_t, std_t = (torch.as_tensor(ckpt_like[k], device=device) for k in ("state_mean", "state_std"))
    n = min(len(seeds), len(envs))
    obs = np.stack([envs[i].reset(seed=int(seeds[i]))[0] for i in range(n)])
    states = torch.zeros(n, K, S, device=device)
    actions = torch.zeros(n, K, A, device=device)
    rtg = torch.zeros(n, K, 1, device=device)
    mask = torch.zeros(n, K, dtype=torch.bool, device=device)
    target = torch.full((n,), ckpt_like["eval_rtg"] * ckpt_like["rtg_scale"], device=device)
    returns, alive = np.zeros(n), np.ones(n, dtype=bool)
    while alive.any():
        # Shift the context one step left and write the newest state and RTG in the last slot.
        states, actions, rtg, mask = (x.roll(-1, dims=1) for x in (states, actions, rtg, mask))
        states[:, -1] = (torch.as_tensor(obs, dtype=torch.float32, device=device) - mean_t) / std_t
        rtg[:, -1, 0], actions[:, -1], mask[:, -1] = target, 0.0, True
        mean, _ = model(rtg, states, actions, mask)
        actions[:, -1] = torch.tanh(mean[:, -1])
        act_np = actions[:, -1].cpu().numpy()
        for i in np.flatnonzero(alive):
            o, r, term, trunc, _ = envs[i].step(act_np[i])
            obs[i], returns[i] = o, returns[i] + r
            target[i] -= r * ckpt_like["rtg_scale"]
            alive[i] = not (term or trunc)
    model.train()
    return returns


# ---------------------------------------------------------------- run state
def save_checkpoint(path: Path, payload: dict):
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def checkpoint_payload(args: Args, data: dict, model, model_config: dict, log_temperature, update: int, score: float):
    """The format-1 checkpoint: the model, its config and everything the finetuning scripts need to act with it."""
    meta = data["eval"]
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "env_id": args.env_id,
        "dataset_id": data["dataset_id"],
        "ref_min_score": data["ref_min"],
        "ref_max_score": data["ref_max"],
        "model_config": {**model_config, "activation": "silu", "c_offline": data["context_len"]},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "state_mean": torch.as_tensor(meta["state_mean"], dtype=torch.float32),
        "state_std": torch.as_tensor(meta["state_std"], dtype=torch.float32),
        "rtg_scale": meta["rtg_scale"],
        "eval_rtg": float(meta["eval_rtg"]),
        "eval_context_len": meta["context_len"],
        "action_margin": args.action_margin,
        "censor_bound": args.censor_bound,
        "log_temperature": float(log_temperature.detach()),
        "target_entropy": -float(model_config["act_dim"]),
        "num_updates": update,
        "eval_normalized_score": score,
        "pretrain_args": asdict(args),
    }


# ---------------------------------------------------------------- setup
def apply_presets(args: Args) -> Args:
    """Fill the size and schedule flags left at None from MODEL_SIZES[--model-size]; an explicit flag wins."""
    preset = MODEL_SIZES[args.model_size]
    return replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})


def check_sizes(args: Args):
    """Every size flag must be positive, and the width must split evenly across heads."""
    names = "num_updates batch_size embed_dim n_layers n_heads eval_episodes context_len eval_context_len".split()
    sizes = {k: getattr(args, k) for k in names}
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in sizes.items() if v is not None and v < 1]
    if bad:
        raise UserError(f"sizes must be at least 1: {', '.join(bad)}")
    if args.embed_dim % args.n_heads:
        raise UserError(f"--embed-dim {args.embed_dim} is not divisible by --n-heads {args.n_heads}")
    if not 0 < args.action_margin < 1 or args.action_mse_coef < 0:
        raise UserError(
            f"--action-margin must be in (0, 1) and --action-mse-coef >= 0 (got {args.action_margin}, {args.action_mse_coef})"
        )
    if args.censor_bound is not None and not 0 < args.censor_bound < 1:
        raise UserError(f"--censor-bound must lie strictly between 0 and 1, got {args.censor_bound}")
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay must lie in [0, 1) (or None: no averaging), got {args.ema_decay}")


def seed_everything(args: Args) -> torch.device:
    """Seed python, numpy and torch, make torch deterministic if asked; the device to run on."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def prepare_data(args: Args) -> dict:
    """The dataset, checked against the env: its id, trajectories, reference scores, the env's (state, action) dims,
    c_offline, and `eval`, what `evaluate` and the checkpoint need (state normalisation, RTG scale, eval RTG, c_online)."""
    family, key = env_family(args.env_id)
    dataset_id, trajs, ref_min, ref_max = load_dataset(
        args.env_id, args.dataset, args.dataset_path, args.random_steps, args.seed
    )
    probe = make_env(args.env_id)
    dims = probe.observation_space.shape[0], probe.action_space.shape[0]
    data_dims = trajs[0]["observations"].shape[1], trajs[0]["actions"].shape[1]
    if data_dims != dims:
        raise UserError(f"dataset {dataset_id} has obs/action dims {data_dims} but {args.env_id} has {dims}")
    all_obs = np.concatenate([t["observations"] for t in trajs])
    returns = np.array([t["rewards"].sum() for t in trajs])
    print(
        f"{dataset_id}: {len(trajs)} trajectories, {len(all_obs)} steps, mean return {returns.mean():.1f} "
        f"(normalized {normalized_score(returns.mean(), ref_min, ref_max):.1f})"
    )
    c_offline, c_online = default_contexts(family, key, dataset_id)
    meta = dict(
        context_len=args.eval_context_len or c_online,
        state_mean=all_obs.mean(0).astype(np.float32),
        state_std=all_obs.std(0).astype(np.float32) + 1e-6,
        rtg_scale=args.rtg_scale if args.rtg_scale is not None else (1.0 if family == "antmaze" else 1e-3),
        eval_rtg=args.eval_rtg if args.eval_rtg is not None else TARGET_RETURNS[key],
    )
    return dict(
        dataset_id=dataset_id,
        trajs=trajs,
        ref_min=ref_min,
        ref_max=ref_max,
        dims=dims,
        context_len=args.context_len or c_offline,
        eval=meta,
    )


def make_writer(args: Args, run_name: str) -> SummaryWriter:
    """TensorBoard writer at `{runs_dir}/{run_name}` (and wandb, synced to it, with --track), hyperparameters logged."""
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


def make_eval_envs(args: Args, run_name: str) -> list:
    """--eval-episodes envs; with --capture-video the first records to `videos/{run_name}`."""
    video = {"render_mode": "rgb_array"} if args.capture_video else {}
    envs = [make_env(args.env_id, **(video if i == 0 else {})) for i in range(args.eval_episodes)]
    if args.capture_video:
        try:
            envs[0] = gym.wrappers.RecordVideo(envs[0], f"videos/{run_name}")
        except gym.error.DependencyNotInstalled as e:
            raise UserError(f"--capture-video needs moviepy ({e})")
    return envs


# ---------------------------------------------------------------- main
def main(args: Args):
    args = apply_presets(args)
    check_sizes(args)
    fix_malloc_mmap_threshold()
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device = seed_everything(args)
    data = prepare_data(args)
    meta, rng = data["eval"], np.random.default_rng(args.seed)
    sampler = SegmentSampler(data["trajs"], data["context_len"], meta["state_mean"], meta["state_std"], meta["rtg_scale"], rng)
    ckpt_path = Path(args.checkpoint or default_checkpoint_path(args.env_id, args.dataset, args.seed, args.model_size))

    # Model and optimisers
    state_dim, act_dim = data["dims"]
    sizes = ("embed_dim", "n_layers", "n_heads", "dropout", "log_std_min", "log_std_max")
    model_config = dict(state_dim=state_dim, act_dim=act_dim, **{k: getattr(args, k) for k in sizes})
    model = DecisionTransformer(**model_config).to(device)
    log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    optimizer = Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / max(1, args.warmup_updates)))
    temperature_opt = torch.optim.Adam([log_temperature], lr=args.temperature_lr)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay)) if args.ema_decay is not None else None
    policy = ema.module if ema else model  # what is evaluated and saved
    writer = make_writer(args, run_name)
    eval_envs = make_eval_envs(args, run_name)

    # ALGO LOGIC: ODT's pretraining, NLL + entropy bonus with a dual temperature
    score, start = float("nan"), time.time()
    pbar = tqdm(range(1, args.num_updates + 1), desc="pretrain", mininterval=2.0)
    for update in pbar:
        batch = (torch.as_tensor(x, device=device) for x in sampler.sample(args.batch_size))
        loss, temperature_loss, nll, entropy, action_mse = dt_loss(
            model,
            log_temperature,
            -float(act_dim),
            *batch,
            margin=args.action_margin,
            mse_coef=args.action_mse_coef,
            censor_bound=args.censor_bound,
        )
        if not torch.isfinite(loss):
            raise UserError(f"non-finite loss at update {update}; stopped, last good checkpoint kept at {ckpt_path}")
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        if ema:
            ema.update_parameters(model)
        warmup.step()
        temperature_opt.zero_grad()
        temperature_loss.backward()
        temperature_opt.step()

        last = update == args.num_updates
        if update % 100 == 0 or last:
            losses = dict(nll=nll, loss=loss, entropy=entropy, action_mse=action_mse, temperature=log_temperature.exp())
            for k, v in losses.items():
                writer.add_scalar(f"losses/{k}", v.item(), update)
            writer.add_scalar("charts/learning_rate", warmup.get_last_lr()[0], update)
            writer.add_scalar("charts/updates_per_s", update / (time.time() - start), update)
            pbar.set_postfix(nll=f"{nll.item():.3f}", ent=f"{entropy.item():.2f}")
        if last or (args.eval_every and update % args.eval_every == 0):
            returns = evaluate(policy, eval_envs, meta, eval_seeds(args.seed, args.eval_episodes), device)
            score = float(normalized_score(returns, data["ref_min"], data["ref_max"]).mean())
            writer.add_scalar("charts/episodic_return", returns.mean(), update)
            writer.add_scalar("charts/normalized_score", score, update)
            tqdm.write(f"update {update}: return {returns.mean():.1f} +- {returns.std():.1f}, normalized score {score:.1f}")
        if last or (args.save_every and update % args.save_every == 0):
            save_checkpoint(ckpt_path, checkpoint_payload(args, data, policy, model_config, log_temperature, update, score))
    writer.close()
    print(f"checkpoint: {ckpt_path} (normalized score {score:.1f})")
    return ckpt_path, score, policy


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
