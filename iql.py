"""Online IQL: Implicit Q-Learning pretrained on the offline data, then finetuned online with the same losses.

The IQL baseline of Table 1 of "Online Finetuning Decision Transformers with Pure RL Gradients" (Luo & Zhu),
Section 4.1 and Appendix B.1 ("we largely follow the implementation of Yan et al. (2024), but set the number of
pretraining steps to match"). IQL (Kostrikov et al., 2021): V(s) by expectile regression on the target Q;
twin Q(s, a) by TD toward r + gamma (1 - terminal) V(s'); a Gaussian actor by advantage-weighted regression with
weights exp(beta (Q_target - V)) clipped at 100; a Polyak target Q. It does not use the DT checkpoint: it
pretrains on the same offline data, then keeps the same losses on a replay buffer holding the offline data plus
its own online transitions, one update per env step. Time-limit truncations bootstrap; terminations do not.

Example (offline machine, the shared data):
    MINARI_DATASETS_PATH=$(realpath ../shared/datasets) \
        python iql.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --online-steps 100000
"""

import ctypes
import os
import random
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Independent, Normal
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
    random_steps: int = 1_000_000
    """env steps of the uniform random policy when `--dataset random` has to be generated locally"""

    offline_updates: int = 5000
    """updates on the offline data before going online: 5000 matches the DT's pretraining budget (pretrain_dt.py),
    as App. B.1 asks; CORL and the IQL paper pretrain for 1M"""
    offline_eval_every: int = 0
    """also evaluate every this many offline updates (`offline/*` vs update); 0: only after pretraining"""
    online_steps: int = 300_000
    """env steps of online finetuning (0: offline only); about ODT's 300 iterations of one <= 1000-step rollout"""
    updates_per_step: int = 1
    """updates (V, Q and actor each) per online env step (CORL, ikostrikov train_finetune.py)"""
    total_env_steps: int = 0
    """online env-step budget (0: none), counted across resumes; the run evaluates, saves and stops on reaching it"""
    max_seconds: float = 0
    """wall-clock budget in seconds from the start of online finetuning (0: none)"""
    batch_size: int = 256
    """transitions per update (IQL paper, CORL)"""
    buffer_size: int = 2_000_000
    """replay capacity in transitions: the offline data is always kept, online ones fill the rest FIFO (CORL)"""
    hidden_dim: int = 256
    """width of the hidden layers of every MLP (IQL paper, CORL)"""
    n_layers: int = 2
    """hidden layers of every MLP (IQL paper, CORL)"""
    actor_lr: float = 3e-4
    """Adam lr of the actor (IQL paper, CORL)"""
    critic_lr: float = 3e-4
    """Adam lr of the twin Q and of V (IQL paper, CORL)"""
    actor_cosine: bool = True
    """cosine-anneal the actor lr to 0 over the offline updates (ikostrikov, CORL), then hold it at --actor-lr online
    (ikostrikov's finetune config does not decay; CORL's CosineAnnealingLR would climb back up periodically)"""
    expectile: Optional[float] = None
    """expectile of V's loss; default 0.7 MuJoCo, 0.9 AntMaze (IQL paper, CORL), 0.8 Adroit (CORL door/pen/hammer)"""
    beta: Optional[float] = None
    """inverse temperature of the advantage weights; default 3.0 MuJoCo and Adroit, 10.0 AntMaze (IQL paper, CORL)"""
    actor_dropout: Optional[float] = None
    """dropout after the actor's hidden layers while training; default 0.1 Adroit (CORL), 0 otherwise"""
    normalize_reward: Optional[bool] = None
    """transform rewards on sampling; default on for MuJoCo (x 1000 / (max - min dataset episode return), IQL paper,
    CORL) and AntMaze (r - 1, IQL paper, CORL), off for Adroit (CORL)"""
    gamma: float = 0.99
    """discount (IQL paper, CORL)"""
    tau: float = 0.005
    """Polyak rate of the target Q (IQL paper, CORL finetune configs)"""
    max_episode_steps: Optional[int] = None
    """cap on the env's time limit, for training and evaluation episodes (tests, quick runs); default the env's own"""
    eval_every: int = 5000
    """evaluate every this many online env steps (CORL's Adroit finetune interval), after pretraining and at the end"""
    eval_episodes: int = 10
    """deterministic (actor mean) evaluation episodes, stepped as one batch"""
    save_every: int = 1
    """write the run state after pretraining, every this many online evaluations (--eval-every env steps each) and at
    the end (0: never)"""
    save_path: Optional[str] = None
    """where the run state goes; default `{runs_dir}/{run_name}/state.pt` (a resumed run: the --resume file)"""
    save_model: bool = False
    """also write the final actor and its state normalisation to `{runs_dir}/{run_name}/{exp_name}.pt`"""
    resume: Optional[str] = None
    """a state.pt to continue bit-exactly; its hyperparameters are kept, the RUN_CONTROL flags come from this command"""


# Flags a resumed run takes from its new command line; every other one comes from the saved state.
RUN_CONTROL = (
    "online_steps total_env_steps max_seconds eval_every eval_episodes save_every save_path save_model resume track "
    "wandb_project_name wandb_entity capture_video cuda"
).split()
# (expectile, beta, actor dropout, normalize reward) per env family; sources in the Args docstrings.
FAMILY_PRESETS = {"mujoco": (0.7, 3.0, 0.0, True), "antmaze": (0.9, 10.0, 0.0, True), "adroit": (0.8, 3.0, 0.1, False)}
MAX_WEIGHT = 100.0  # clip of the advantage weights (IQL paper, CORL's EXP_ADV_MAX)
LOG_STD_RANGE = (-5.0, 2.0)  # clip of the actor's log-std (the IQL paper's code)
STATE_FORMAT = "iql-run-state-1"


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


def load_transitions(dataset_id: str, dataset_path: Optional[str], family: str) -> dict:
    """(s, a, r, s', terminal) arrays of the offline data. `episodes_to_trajectories` drops each episode's last
    observation, which the last TD target of a truncated episode needs, so this re-reads the episodes whole."""
    import h5py
    import minari

    if dataset_path is not None:
        with h5py.File(dataset_path, "r") as f:
            data = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
        n, ends = len(data["rewards"]), data["terminals"] | data["timeouts"]
        episode = np.concatenate([[0], np.cumsum(ends[:-1])])
        keep = np.bincount(episode)[episode] > 1 if family == "antmaze" else np.ones(n, bool)
        if "next_observations" not in data:  # s' is the next row within an episode; a timeout's s' is unknown
            data["next_observations"] = np.concatenate([data["observations"][1:], data["observations"][-1:]])
            keep &= ~data["timeouts"] & ((np.arange(n) < n - 1) | data["terminals"])
        out = {k: data[k][keep] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
    else:
        parts = []
        for ep in minari.load_dataset(dataset_id).iterate_episodes():
            obs = flatten_antmaze_obs(ep.observations) if family == "antmaze" else ep.observations
            if family != "antmaze" or len(ep.rewards) > 1:  # load_dataset drops 1-step AntMaze trajectories
                arrays = dict(observations=obs[:-1], actions=ep.actions, rewards=ep.rewards, next_observations=obs[1:])
                parts.append({**arrays, "terminals": ep.terminations})
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return {k: v.astype(bool if k == "terminals" else np.float32) for k, v in out.items()}


def reward_transform(family: str, episode_returns: np.ndarray, normalize: bool) -> tuple[float, float]:
    """(scale, shift) of r' = scale * r + shift: AntMaze r - 1; otherwise r * 1000 / (max - min episode return)."""
    if not normalize:
        return 1.0, 0.0
    if family == "antmaze":
        return 1.0, -1.0
    spread = float(episode_returns.max() - episode_returns.min())
    if spread <= 0:
        raise UserError("reward normalisation needs episodes of different returns; pass --normalize-reward False")
    return 1000.0 / spread, 0.0


def prepare_offline(args: Args, family: str, state_dim: int, act_dim: int) -> dict:
    """The offline transitions, resolved exactly as pretrain_dt.py resolves the data, with the reference scores, the
    frozen state normalisation and the reward transform."""
    dataset_id, trajs, ref_min, ref_max = load_dataset(
        args.env_id, args.dataset, args.dataset_path, args.random_steps, args.seed
    )
    offline = load_transitions(dataset_id, args.dataset_path, family)
    dims, n_offline = (offline["observations"].shape[1], offline["actions"].shape[1]), len(offline["rewards"])
    if dims != (state_dim, act_dim):
        raise UserError(f"dataset {dataset_id} has obs/action dims {dims} but {args.env_id} has {(state_dim, act_dim)}")
    if args.online_steps > 0 and args.buffer_size <= n_offline:
        raise UserError(
            f"--buffer-size {args.buffer_size} leaves no room for online data beside the {n_offline} offline transitions"
        )
    returns = np.array([t["rewards"].sum() for t in trajs])
    reward_scale, reward_shift = reward_transform(family, returns, args.normalize_reward)
    return dict(
        dataset_id=dataset_id,
        offline=offline,
        ref_min=ref_min,
        ref_max=ref_max,
        state_mean=offline["observations"].mean(0),
        state_std=offline["observations"].std(0) + 1e-3,  # CORL
        reward_scale=reward_scale,
        reward_shift=reward_shift,
    )


def normalize_batch(batch: dict, data: dict) -> dict:
    """States normalised with the offline statistics, rewards transformed (both at sampling, so replay stays raw)."""
    for k in ("observations", "next_observations"):
        batch[k] = (batch[k] - data["state_mean"]) / data["state_std"]
    batch["rewards"] = data["reward_scale"] * batch["rewards"] + data["reward_shift"]
    return batch


# ---------------------------------------------------------------- model
def mlp(in_dim: int, out_dim: int, hidden_dim: int, n_layers: int, dropout: float = 0.0) -> nn.Sequential:
    layers, width = [], in_dim
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden_dim), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, out_dim))


class TwinQ(nn.Module):
    def __init__(self, state_dim: int, act_dim: int, hidden_dim: int, n_layers: int):
        super().__init__()
        self.q1 = mlp(state_dim + act_dim, 1, hidden_dim, n_layers)
        self.q2 = mlp(state_dim + act_dim, 1, hidden_dim, n_layers)

    def forward(self, states, actions):
        x = torch.cat([states, actions], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class ValueFunction(nn.Module):
    def __init__(self, state_dim: int, hidden_dim: int, n_layers: int):
        super().__init__()
        self.net = mlp(state_dim, 1, hidden_dim, n_layers)

    def forward(self, states):
        return self.net(states).squeeze(-1)


class GaussianActor(nn.Module):
    """N(tanh(mlp(s)), exp(log_std)) with a state-independent log-std, as the IQL paper's and CORL's actors; not
    squashed, so dataset actions sitting exactly on +-1 have finite likelihood."""

    def __init__(self, state_dim: int, act_dim: int, hidden_dim: int, n_layers: int, dropout: float):
        super().__init__()
        self.mean_net = mlp(state_dim, act_dim, hidden_dim, n_layers, dropout)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, states) -> Independent:
        std = self.log_std.clamp(*LOG_STD_RANGE).exp()
        return Independent(Normal(torch.tanh(self.mean_net(states)), std), 1)


# ---------------------------------------------------------------- algorithm pieces
def expectile_loss(diff, expectile: float):
    """mean |expectile - 1(diff < 0)| diff^2: above 0.5, underestimates (diff > 0) cost more, so V tracks an upper
    expectile of Q."""
    return (torch.abs(expectile - (diff < 0).float()) * diff**2).mean()


def advantage_weights(adv, beta: float, max_weight: float = MAX_WEIGHT):
    return torch.exp(beta * adv).clamp(max=max_weight)


def td_target(rewards, terminals, next_v, gamma: float):
    """r + gamma (1 - terminal) V(s'): only a termination cuts the bootstrap; a time-limit end is not terminal."""
    return rewards + gamma * (1.0 - terminals.float()) * next_v


def value_loss(v, target_q, expectile: float):
    """V's expectile regression toward min(target Q1, Q2)(s, a) of the data actions."""
    return expectile_loss(target_q - v, expectile)


def q_loss(q1, q2, td_targets):
    """Both heads' MSE to the TD target, summed as in the IQL paper's code."""
    return F.mse_loss(q1, td_targets) + F.mse_loss(q2, td_targets)


def actor_loss(log_prob, adv, beta: float):
    """Advantage-weighted regression: the data actions' negative log-likelihood, weighted by exp(beta * adv)."""
    return -(advantage_weights(adv.detach(), beta) * log_prob).mean()


def polyak_update(target: nn.Module, source: nn.Module, tau: float):
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, tau)


def optimize(optimizer, loss, name: str):
    if not torch.isfinite(loss):  # stop before the step, so the nets never hold a NaN
        raise FloatingPointError(name)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def iql_update(agent: nn.ModuleDict, optimizers: dict, scheduler, batch: dict, args: Args) -> dict:
    """One IQL step in CORL's order: V, Q and the actor all from one set of forwards (target Q, V(s) and V(s') before
    V's step), then Polyak; the IQL paper's code recomputes V (and target Q) after V's step, at three more forwards."""
    states, actions = batch["observations"], batch["actions"]
    with torch.no_grad():
        target_q = torch.min(*agent["q_target"](states, actions))
        targets = td_target(batch["rewards"], batch["terminals"], agent["v"](batch["next_observations"]), args.gamma)
    v = agent["v"](states)
    vf_loss = value_loss(v, target_q, args.expectile)
    optimize(optimizers["v"], vf_loss, "vf_loss")
    q1, q2 = agent["q"](states, actions)
    qf_loss = q_loss(q1, q2, targets)
    optimize(optimizers["q"], qf_loss, "qf_loss")
    adv = target_q - v.detach()
    pi_loss = actor_loss(agent["actor"](states).log_prob(actions), adv, args.beta)
    optimize(optimizers["actor"], pi_loss, "actor_loss")
    scheduler.step()
    polyak_update(agent["q_target"], agent["q"], args.tau)
    return dict(qf_loss=qf_loss, vf_loss=vf_loss, actor_loss=pi_loss, adv_mean=adv.mean(), q_mean=q1.mean())


class ReplayBuffer:
    """The offline transitions, kept for good, plus a FIFO ring of online ones; batches are uniform over both.
    The ring grows by doubling, so a large capacity costs no memory until it is used."""

    def __init__(self, offline: dict, capacity: int):
        self.offline, self.n_offline = offline, len(offline["rewards"])
        self.online_capacity = capacity - self.n_offline
        self.online = {k: v[:0].copy() for k, v in offline.items()}
        self.online_size, self.next = 0, 0

    def add(self, **transition):
        allocated = len(self.online["rewards"])
        if self.next == allocated < self.online_capacity:
            grow = min(self.online_capacity, max(1024, 2 * allocated)) - allocated
            self.online = {k: np.concatenate([v, np.zeros((grow, *v.shape[1:]), v.dtype)]) for k, v in self.online.items()}
        for k, v in transition.items():
            self.online[k][self.next] = v
        self.next = (self.next + 1) % self.online_capacity
        self.online_size = min(self.online_size + 1, self.online_capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict:
        idx = rng.integers(0, self.n_offline + self.online_size, size=batch_size)
        online = idx >= self.n_offline
        batch = {}
        for k, data in self.offline.items():
            batch[k] = data[np.where(online, 0, idx)]
            batch[k][online] = self.online[k][idx[online] - self.n_offline]
        return batch

    def state_dict(self) -> dict:
        online = {k: v[: self.online_size].copy() for k, v in self.online.items()}
        return dict(online=online, online_size=self.online_size, next=self.next)

    def load_state_dict(self, state: dict):
        self.online, self.online_size, self.next = state["online"], state["online_size"], state["next"]


@torch.no_grad()
def act(actor, obs: np.ndarray, state_mean, state_std, sample: bool, device) -> np.ndarray:
    """Actions for a batch of raw observations: the mean (evaluation) or a sample (exploration), clipped to +-1.
    Dropout is off for acting: it is a training regulariser, not part of the policy."""
    was_training = actor.training
    actor.eval()
    states = torch.as_tensor((obs - state_mean) / state_std, dtype=torch.float32, device=device)
    dist = actor(states)
    actor.train(was_training)
    return (dist.sample() if sample else dist.mean).clamp(-1.0, 1.0).cpu().numpy()


def evaluate(actor, envs, seeds, state_mean, state_std, device) -> np.ndarray:
    """Deterministic episodes, all envs stepped in lockstep with one batched forward per step; the returns."""
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])
    returns, alive = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    while alive.any():
        actions = act(actor, obs, state_mean, state_std, sample=False, device=device)
        for i in np.flatnonzero(alive):
            obs[i], reward, terminated, truncated, _ = envs[i].step(actions[i])
            returns[i] += reward
            alive[i] = not (terminated or truncated)
    return returns


def train_episode_seed(seed: int, episode: int) -> int:
    """Reset seed of training episode `episode`, so a resumed run can rebuild the episode it was saved in."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


@dataclass
class Run:
    """One run's parts: what it trains and saves (agent, optimizers, the actor's lr scheduler, the replay buffer, the
    batch rng), its offline data, where it logs and evaluates, and where its state goes."""

    args: Args
    run_name: str
    data: dict
    agent: nn.ModuleDict
    optimizers: dict
    scheduler: torch.optim.lr_scheduler.LambdaLR
    buffer: ReplayBuffer
    rng: np.random.Generator
    device: torch.device
    writer: SummaryWriter
    eval_envs: list
    run_dir: Path
    state_path: Path


def non_finite_error(run: Run, what: str, where: str) -> UserError:
    kept = f"last good state kept at {run.state_path}" if run.state_path.is_file() else "no state saved yet"
    return UserError(f"non-finite {what} at {where}; stopped, {kept}")


def update(run: Run, step: int, phase: str):
    """One IQL update on a replay batch, logged every 100 steps (`offline/*` vs update, online `losses/*` vs env step);
    a non-finite loss stops the run."""
    batch = normalize_batch(run.buffer.sample(run.args.batch_size, run.rng), run.data)
    batch = {k: torch.as_tensor(v, device=run.device) for k, v in batch.items()}
    try:
        stats = iql_update(run.agent, run.optimizers, run.scheduler, batch, run.args)
    except FloatingPointError as e:
        raise non_finite_error(run, str(e), f"{phase} step {step}")
    if step % 100 == 0:
        prefix = "offline" if phase == "offline" else "losses"
        for k, v in stats.items():
            run.writer.add_scalar(f"{prefix}/{k}", v.item(), step)


def evaluate_and_log(run: Run, step: int, prefix: str) -> float:
    """Evaluate the actor's mean on --eval-episodes episodes; log and return the mean normalized score."""
    seeds, data = eval_seeds(run.args.seed, run.args.eval_episodes), run.data
    returns = evaluate(run.agent["actor"], run.eval_envs, seeds, data["state_mean"], data["state_std"], run.device)
    scores = normalized_score(returns, data["ref_min"], data["ref_max"])
    score, sem = float(scores.mean()), float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else 0.0
    run.writer.add_scalar(f"{prefix}/normalized_score", score, step)
    run.writer.add_scalar(f"{prefix}/normalized_score_sem", sem, step)  # standard error over the episodes
    run.writer.add_scalar(f"{prefix}/eval_return", returns.mean(), step)
    tqdm.write(f"{prefix} step {step}: return {returns.mean():.1f}, normalized score {score:.2f} +- {sem:.2f} (sem)")
    return score


# ---------------------------------------------------------------- run state
def save_checkpoint(path: Path, payload: dict):
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_resume(args: Args) -> tuple[Args, dict]:
    """The saved run state, and the saved Args with this command's RUN_CONTROL flags."""
    if not Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume!r} is not a file")
    state = torch.load(args.resume, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"--resume {args.resume!r} is not a state.pt written by iql.py")
    return replace(Args(**state["args"]), **{k: getattr(args, k) for k in RUN_CONTROL}), state


def save_run_state(run: Run, counters: dict):
    """Everything a resumed run needs to continue exactly: nets, targets, optimisers, schedule, the online part of
    the replay (the offline part is re-read from the dataset), every RNG, and the counters."""
    state = dict(
        format=STATE_FORMAT,
        args=asdict(run.args),
        run_name=run.run_name,
        agent=run.agent.state_dict(),
        optimizers={k: o.state_dict() for k, o in run.optimizers.items()},
        scheduler=run.scheduler.state_dict(),
        buffer=run.buffer.state_dict(),
        numpy_rng=run.rng.bit_generator.state,
        torch_rng=torch.get_rng_state(),
        python_rng=random.getstate(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        counters=counters,
    )
    save_checkpoint(run.state_path, state)


def restore_run_state(run: Run, state: dict) -> dict:
    """Load a saved state into the freshly built parts of `run`; returns the saved counters."""
    for k in ("agent", "scheduler", "buffer"):
        getattr(run, k).load_state_dict(state[k])
    for k, optimizer in run.optimizers.items():
        optimizer.load_state_dict(state["optimizers"][k])
    run.rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    return state["counters"]


def replay_saved_episode(run: Run, env: gym.Env, counters: dict) -> np.ndarray:
    """Reset the training env to the episode the counters are in, replaying its saved actions; the observation."""
    obs = env.reset(seed=train_episode_seed(run.args.seed, counters["episode"]))[0]
    for action in counters["episode_actions"]:
        obs = env.step(action)[0]
    if "obs" in counters and not np.array_equal(obs, counters["obs"]):
        raise UserError(
            f"replaying the saved episode did not reach the saved observation: {run.args.env_id} is not "
            "deterministic here, so --resume cannot continue exactly"
        )
    return obs


# ---------------------------------------------------------------- setup
def apply_presets(args: Args, family: str) -> Args:
    """Fill the None (= family preset) fields from FAMILY_PRESETS."""
    expectile, beta, dropout, normalize = FAMILY_PRESETS[family]
    return replace(
        args,
        expectile=expectile if args.expectile is None else args.expectile,
        beta=beta if args.beta is None else args.beta,
        actor_dropout=dropout if args.actor_dropout is None else args.actor_dropout,
        normalize_reward=normalize if args.normalize_reward is None else args.normalize_reward,
    )


def check_sizes(args: Args):
    positive = ("batch_size", "hidden_dim", "n_layers", "eval_episodes", "eval_every", "buffer_size", "updates_per_step")
    counts = ("offline_updates", "online_steps", "save_every", "offline_eval_every", "total_env_steps")
    sizes = {k: getattr(args, k) for k in positive} | {"max_episode_steps": args.max_episode_steps or 1}
    bad = [f"--{k.replace('_', '-')} {v} (min 1)" for k, v in sizes.items() if v < 1]
    bad += [f"--{k.replace('_', '-')} {getattr(args, k)} (min 0)" for k in counts if getattr(args, k) < 0]
    if not 0 < args.expectile < 1:
        bad.append(f"--expectile {args.expectile} (must be in (0, 1))")
    if bad:
        raise UserError(f"bad sizes: {', '.join(bad)}")


def seed_everything(args: Args) -> torch.device:
    """Seed python, numpy and torch, make torch deterministic if asked; the device to run on."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def make_agent(args: Args, state_dim: int, act_dim: int, device):
    """(nets, their Adam optimisers, the actor's lr schedule)."""
    nets = dict(
        actor=GaussianActor(state_dim, act_dim, args.hidden_dim, args.n_layers, args.actor_dropout),
        q=TwinQ(state_dim, act_dim, args.hidden_dim, args.n_layers),
        q_target=TwinQ(state_dim, act_dim, args.hidden_dim, args.n_layers),
        v=ValueFunction(state_dim, args.hidden_dim, args.n_layers),
    )
    agent = nn.ModuleDict(nets).to(device)
    agent["q_target"].load_state_dict(agent["q"].state_dict())
    agent["q_target"].requires_grad_(False)
    lrs = dict(actor=args.actor_lr, q=args.critic_lr, v=args.critic_lr)
    optimizers = {k: torch.optim.Adam(agent[k].parameters(), lr=lr) for k, lr in lrs.items()}

    def actor_lr_factor(actor_steps: int) -> float:
        if not args.actor_cosine or actor_steps >= args.offline_updates:
            return 1.0
        return 0.5 * (1.0 + np.cos(np.pi * actor_steps / args.offline_updates))

    return agent, optimizers, torch.optim.lr_scheduler.LambdaLR(optimizers["actor"], actor_lr_factor)


def make_writer(args: Args, run_name: str, run_dir: Path) -> SummaryWriter:
    """TensorBoard writer at `run_dir` (and wandb, synced to it, with --track), hyperparameters logged."""
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
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


def make_eval_envs(args: Args, run_name: str, **env_kw) -> list:
    """--eval-episodes envs; with --capture-video the first records to `videos/{run_name}`."""
    video = {"render_mode": "rgb_array"} if args.capture_video else {}
    envs = [make_env(args.env_id, **env_kw, **(video if i == 0 else {})) for i in range(args.eval_episodes)]
    if args.capture_video:
        try:
            envs[0] = gym.wrappers.RecordVideo(envs[0], f"videos/{run_name}")
        except gym.error.DependencyNotInstalled as e:
            raise UserError(f"--capture-video needs moviepy ({e})")
    return envs


def build_run(args: Args, family: str, run_name: str, state_path: Optional[Path], device) -> tuple[Run, gym.Env]:
    """The run's parts, built fresh (a resumed run then loads its state into them), and the training env."""
    env_kw = {} if args.max_episode_steps is None else {"max_episode_steps": args.max_episode_steps}
    train_env = make_env(args.env_id, **env_kw)
    state_dim, act_dim = train_env.observation_space.shape[0], train_env.action_space.shape[0]
    data = prepare_offline(args, family, state_dim, act_dim)
    buffer, rng = ReplayBuffer(data["offline"], args.buffer_size), np.random.default_rng(args.seed)
    agent, optimizers, scheduler = make_agent(args, state_dim, act_dim, device)
    run_dir = Path(args.runs_dir) / run_name
    run = Run(
        args=args,
        run_name=run_name,
        data=data,
        agent=agent,
        optimizers=optimizers,
        scheduler=scheduler,
        buffer=buffer,
        rng=rng,
        device=device,
        writer=make_writer(args, run_name, run_dir),
        eval_envs=make_eval_envs(args, run_name, **env_kw),
        run_dir=run_dir,
        state_path=state_path or run_dir / "state.pt",
    )
    return run, train_env


def budget_reached(args: Args, env_steps: int, online_seconds: float) -> bool:
    """--online-steps, --total-env-steps (counted across resumes) or --max-seconds (of this process's online phase)."""
    return (
        env_steps >= args.online_steps
        or (args.total_env_steps > 0 and env_steps >= args.total_env_steps)
        or (args.max_seconds > 0 and online_seconds >= args.max_seconds)
    )


# ---------------------------------------------------------------- main
def main(args: Args) -> dict:
    args, saved = load_resume(args) if args.resume else (args, None)
    family, _ = env_family(args.env_id)
    args = apply_presets(args, family)
    check_sizes(args)
    fix_malloc_mmap_threshold()
    run_name = saved["run_name"] if saved else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device = seed_everything(args)
    state_path = args.save_path or args.resume
    run, train_env = build_run(args, family, run_name, Path(state_path) if state_path else None, device)
    agent, data, buffer, writer = run.agent, run.data, run.buffer, run.writer
    print(f"run state: {run.state_path}" if args.save_every else "run state: not saved (--save-every 0)")

    # ALGO LOGIC: offline IQL on the dataset, then "iteration 0", the evaluation every online curve starts from
    if saved is None:
        t_offline, eval_seconds = time.time(), 0.0
        for step in tqdm(range(1, args.offline_updates + 1), desc="offline IQL", mininterval=2.0):
            update(run, step, "offline")
            if args.offline_eval_every and step % args.offline_eval_every == 0 and step < args.offline_updates:
                t_eval = time.time()
                evaluate_and_log(run, step, "offline")
                eval_seconds += time.time() - t_eval
        if args.offline_updates:
            updates_per_s = args.offline_updates / (time.time() - t_offline - eval_seconds)
            writer.add_scalar("offline/updates_per_s", updates_per_s, args.offline_updates)
        score = evaluate_and_log(run, 0, "charts")
        writer.add_scalar("offline/normalized_score", score, args.offline_updates)
        writer.add_scalar("charts/env_steps", 0, 0)
        writer.add_scalar("charts/grad_updates", args.offline_updates, 0)
        counters = dict(
            env_steps=0,
            grad_updates=args.offline_updates,
            episode=0,
            episode_actions=[],
            episode_return=0.0,
            evals=1,
            score=score,
        )
        if args.save_every:
            save_run_state(run, counters)
    else:
        counters = restore_run_state(run, saved)
        print(f"resumed {args.resume} at env step {counters['env_steps']}")

    # ALGO LOGIC: online finetuning, one env step then --updates-per-step updates on the offline + online replay
    obs = replay_saved_episode(run, train_env, counters)
    t_online, start_steps = time.time(), counters["env_steps"]
    done = counters["env_steps"] >= min(args.online_steps, args.total_env_steps or args.online_steps)
    pbar = tqdm(total=args.online_steps, initial=counters["env_steps"], desc="online IQL", mininterval=2.0)
    while not done:
        action = act(agent["actor"], obs[None], data["state_mean"], data["state_std"], sample=True, device=device)[0]
        if not np.isfinite(action).all():
            raise non_finite_error(run, "action", f"online step {counters['env_steps'] + 1}")
        next_obs, reward, terminated, truncated, _ = train_env.step(action)
        buffer.add(observations=obs, actions=action, rewards=reward, next_observations=next_obs, terminals=terminated)
        counters["episode_actions"].append(action)
        counters["episode_return"] += float(reward)
        counters["env_steps"] = env_steps = counters["env_steps"] + 1
        obs = next_obs
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", counters["episode_return"], env_steps)
            counters.update(episode=counters["episode"] + 1, episode_actions=[], episode_return=0.0)
            obs = train_env.reset(seed=train_episode_seed(args.seed, counters["episode"]))[0]
        for _ in range(args.updates_per_step):
            counters["grad_updates"] += 1
            update(run, env_steps, "online")
        pbar.update(1)

        done = budget_reached(args, env_steps, time.time() - t_online)
        if done or env_steps % args.eval_every == 0:
            counters["score"] = evaluate_and_log(run, env_steps, "charts")
            counters["evals"] += 1
            writer.add_scalar("charts/env_steps", env_steps, env_steps)
            writer.add_scalar("charts/grad_updates", counters["grad_updates"], env_steps)
            writer.add_scalar("charts/SPS", (env_steps - start_steps) / (time.time() - t_online), env_steps)
            if args.save_every and (done or counters["evals"] % args.save_every == 0):
                save_run_state(run, {**counters, "obs": obs})
    pbar.close()
    if args.save_model:
        actor = dict(actor=agent["actor"].state_dict(), state_mean=data["state_mean"], state_std=data["state_std"])
        save_checkpoint(run.run_dir / f"{args.exp_name}.pt", {**actor, "args": asdict(args)})
    writer.close()
    steps, updates, score = counters["env_steps"], counters["grad_updates"], counters["score"]
    print(f"{run_name}: {steps} online env steps, {updates} updates, normalized score {score:.2f}")
    return dict(run_dir=run.run_dir, state_path=run.state_path, agent=agent, **counters)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
