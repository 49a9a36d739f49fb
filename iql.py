"""Online IQL (Kostrikov et al., 2021), the IQL baseline of the paper (Table 1, Section 4.1, App. B.1): pretrained on the
offline data for the DT's number of updates, then finetuned online, one update per env step on offline + online replay.

    python iql.py --env-id Hopper-v4 --dataset medium --online-steps 100000
"""

import contextlib
import ctypes
import os
import random
import socket
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import gymnasium as gym
import h5py
import minari
import numpy as np
import torch
import torch.nn as nn
import tyro
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
    offline_updates: int = 5000  # offline updates before going online (App. B.1; CORL: 1M)
    online_steps: int = 300_000  # env steps of online finetuning, one update each (0: offline only)
    total_env_steps: int = 0  # stop when online env steps reach this (0: no budget)
    max_seconds: float = 0  # wall-clock budget in seconds of this process's online finetuning (0: none)
    batch_size: int = 256  # transitions per update (IQL paper, CORL)
    buffer_size: int = 2_000_000  # replay capacity; offline data kept, online data FIFO in the rest (CORL)
    hidden_dim: int = 256  # width of the two hidden layers of every MLP (IQL paper, CORL)
    actor_lr: float = 3e-4  # actor Adam lr, cosine-annealed over the offline updates, then held
    critic_lr: float = 3e-4  # Adam lr of the twin Q and of V (IQL paper, CORL)
    expectile: Optional[float] = None  # expectile of V's loss (0.7 MuJoCo, 0.9 AntMaze, 0.8 Adroit)
    beta: Optional[float] = None  # inverse temperature of the advantage weights (3 MuJoCo, Adroit; 10 AntMaze)
    actor_dropout: Optional[float] = None  # actor dropout in training (0.1 Adroit, CORL; else 0)
    normalize_reward: Optional[bool] = None  # IQL's reward scaling (MuJoCo, AntMaze); default on, off on Adroit
    gamma: float = 0.99  # discount (IQL paper, CORL)
    tau: float = 0.005  # Polyak rate of the target Q (IQL paper, CORL)
    max_episode_steps: Optional[int] = None  # override the env's time limit (tests and quick runs)
    eval_every: int = 5000  # evaluate every this many online env steps, after pretraining and at the end
    eval_episodes: int = 10  # deterministic (actor mean) evaluation episodes, stepped as one batch
    save_every: int = 1  # write the run state after pretraining, every this many online evaluations and at the end (0: never)
    save_path: Optional[str] = None  # where the run state goes; default `{runs_dir}/{run_name}/state.pt`, or the --resume file
    save_model: bool = False  # also write the final actor and its state normalisation to `{runs_dir}/{run_name}/{exp_name}.pt`
    resume: Optional[str] = None  # continue a run state; only --online-steps, --total-env-steps, --max-seconds may change


BUDGET = ("online_steps", "total_env_steps", "max_seconds")  # the flags a resumed run takes from its command
PRESET_FLAGS = ("expectile", "beta", "actor_dropout", "normalize_reward")  # sources in the Args docstrings
PRESETS = dict(mujoco=(0.7, 3.0, 0.0, True), antmaze=(0.9, 10.0, 0.0, True), adroit=(0.8, 3.0, 0.1, False))


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


def load_offline(args: Args, family: str, env: gym.Env) -> dict:
    """(s, a, r, s', terminal) of the data pretrain_dt.py trains on, re-read whole for each episode's last s'."""
    dataset_id, trajs, *ref = load_dataset(args.env_id, args.dataset, args.dataset_path, random_steps=10**6, seed=args.seed)
    if args.dataset_path is not None:
        with h5py.File(args.dataset_path, "r") as f:
            data = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
        n, ends = len(data["rewards"]), data["terminals"] | data["timeouts"]
        episode = np.concatenate([[0], np.cumsum(ends[:-1])])
        keep = np.bincount(episode)[episode] > 1 if family == "antmaze" else np.ones(n, bool)
        if "next_observations" not in data:  # s' is the next row within an episode; a timeout's s' is unknown
            data["next_observations"] = np.concatenate([data["observations"][1:], data["observations"][-1:]])
            keep &= ~data["timeouts"] & ((np.arange(n) < n - 1) | data["terminals"])
        out = {k: data[k][keep] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
    else:
        episodes = []
        for ep in minari.load_dataset(dataset_id).iterate_episodes():
            obs = flatten_antmaze_obs(ep.observations) if family == "antmaze" else ep.observations
            if family != "antmaze" or len(ep.rewards) > 1:  # load_dataset drops 1-step AntMaze trajectories
                arrays = dict(observations=obs[:-1], actions=ep.actions, rewards=ep.rewards, next_observations=obs[1:])
                episodes.append({**arrays, "terminals": ep.terminations})
        out = {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]}
    offline = {k: v.astype(bool if k == "terminals" else np.float32) for k, v in out.items()}
    dims = offline["observations"].shape[1:] + offline["actions"].shape[1:]
    if dims != (env_dims := env.observation_space.shape + env.action_space.shape):
        raise UserError(f"dataset {dataset_id} has obs/action dims {dims} but {args.env_id} has {env_dims}")
    if args.online_steps > 0 and args.buffer_size <= len(offline["rewards"]):
        raise UserError(f"--buffer-size must be > the {len(offline['rewards'])} offline transitions, got {args.buffer_size}")
    reward = reward_transform(family, np.array([t["rewards"].sum() for t in trajs]), args.normalize_reward)
    mean, std = offline["observations"].mean(0), offline["observations"].std(0) + 1e-3  # CORL
    return dict(offline=offline, ref=ref, state_mean=mean, state_std=std, reward=reward)


def reward_transform(family: str, episode_returns: np.ndarray, normalize: bool) -> tuple[float, float]:
    """(scale, shift) of r' = scale r + shift: r - 1 on AntMaze, else r x 1000 / (max - min episode return)."""
    if not normalize or family == "antmaze":
        return 1.0, -1.0 if normalize else 0.0
    return 1000.0 / float(episode_returns.max() - episode_returns.min()), 0.0


def mlp(in_dim: int, out_dim: int, hidden_dim: int, dropout: float = 0.0) -> nn.Sequential:
    layers = []
    for width in (in_dim, hidden_dim):  # two hidden layers (IQL paper, CORL)
        layers += [nn.Linear(width, hidden_dim), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
    return nn.Sequential(*layers, nn.Linear(hidden_dim, out_dim))


def expectile_loss(diff, expectile: float):
    """|expectile - 1(diff < 0)| diff^2: above 0.5 an underestimate costs more, so V tracks an upper expectile of Q."""
    return (torch.abs(expectile - (diff < 0).float()) * diff**2).mean()


def td_target(rewards, terminals, next_v, gamma: float):
    """r + gamma (1 - terminal) V(s'): only a termination cuts the bootstrap, a time-limit end does not."""
    return rewards + gamma * (1.0 - terminals.float()) * next_v


def q_loss(q1, q2, td_targets):
    return nn.functional.mse_loss(q1, td_targets) + nn.functional.mse_loss(q2, td_targets)  # both heads, as the IQL code


def awr_loss(log_prob, adv, beta: float):
    """Advantage-weighted regression: the data actions' NLL weighted by exp(beta adv), clipped at 100 (CORL)."""
    return -(torch.exp(beta * adv.detach()).clamp(max=100.0) * log_prob).mean()


class IQL(nn.Module):
    """V, twin Q with its Polyak target and a Gaussian actor, on states normalised as the offline data."""

    def __init__(self, args: Args, data: dict, obs_dim: int, act_dim: int, device):
        super().__init__()
        self.args, self.device, self.reward = args, device, data["reward"]
        self.mean, self.std = data["state_mean"], data["state_std"]
        self.actor = mlp(obs_dim, act_dim, args.hidden_dim, args.actor_dropout)  # the action mean, before its tanh
        self.actor.log_std = nn.Parameter(torch.zeros(act_dim))  # state-independent (IQL paper, CORL)
        self.q, self.q_target = (nn.ModuleList(mlp(obs_dim + act_dim, 1, args.hidden_dim) for _ in range(2)) for _ in range(2))
        self.v = mlp(obs_dim, 1, args.hidden_dim)
        self.q_target.load_state_dict(self.q.state_dict())
        self.to(device)
        critics = dict(params=[*self.q.parameters(), *self.v.parameters()], lr=args.critic_lr)
        self.optimizer = torch.optim.Adam([dict(params=self.actor.parameters()), critics], lr=args.actor_lr)

    def normalize(self, obs: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((obs - self.mean) / self.std, dtype=torch.float32, device=self.device)

    def policy(self, states):  # N(tanh(mlp(s)), std), unsquashed (IQL paper, CORL): data actions on +-1 stay likely
        return torch.distributions.Normal(torch.tanh(self.actor(states)), self.actor.log_std.clamp(-5.0, 2.0).exp())

    @torch.no_grad()
    def act(self, obs: np.ndarray, sample: bool) -> np.ndarray:
        """The mean (evaluation) or a sample (exploration), clipped to +-1; dropout is for training only."""
        self.actor.eval()
        dist = self.policy(self.normalize(obs))
        self.actor.train()
        return (dist.sample() if sample else dist.mean).clamp(-1.0, 1.0).cpu().numpy()

    def update(self, batch: dict, actor_lr: float) -> dict:
        """V, Q and the actor on one batch, targets from the nets before the step; no gradient is shared, so one backward."""
        states, next_states = self.normalize(batch["observations"]), self.normalize(batch["next_observations"])
        actions, terminals = (torch.as_tensor(batch[k], device=self.device) for k in ("actions", "terminals"))
        rewards = torch.as_tensor(self.reward[0] * batch["rewards"] + self.reward[1], device=self.device)
        states_actions = torch.cat([states, actions], -1)
        with torch.no_grad():
            target_q = torch.min(*(q(states_actions).squeeze(-1) for q in self.q_target))
            targets = td_target(rewards, terminals, self.v(next_states).squeeze(-1), self.args.gamma)
        v, (q1, q2) = self.v(states).squeeze(-1), (q(states_actions).squeeze(-1) for q in self.q)
        adv = target_q - v.detach()
        log_prob = self.policy(states).log_prob(actions).sum(-1)
        losses = dict(qf_loss=q_loss(q1, q2, targets), vf_loss=expectile_loss(target_q - v, self.args.expectile))
        losses["actor_loss"] = awr_loss(log_prob, adv, self.args.beta)
        self.optimizer.param_groups[0]["lr"] = actor_lr
        self.optimizer.zero_grad()
        sum(losses.values()).backward()
        self.optimizer.step()
        with torch.no_grad():
            for target, source in zip(self.q_target.parameters(), self.q.parameters()):
                target.lerp_(source, self.args.tau)
        return dict(**losses, adv_mean=adv.mean(), q_mean=q1.mean())


class ReplayBuffer:
    """The offline transitions, kept for good, then a first-in first-out ring of online ones; batches are uniform."""

    def __init__(self, offline: dict, capacity: int, seed: int):
        self.n, self.size, self.next, self.rng = len(offline["rewards"]), 0, 0, np.random.default_rng(seed)
        self.capacity = max(capacity - self.n, 0)  # online slots; np.zeros pages them in as the ring fills
        self.data = {k: np.zeros((self.n + self.capacity, *v.shape[1:]), v.dtype) for k, v in offline.items()}
        for k, v in offline.items():
            self.data[k][: self.n] = v

    def add(self, **transition):
        for k, v in transition.items():
            self.data[k][self.n + self.next] = v
        self.next, self.size = (self.next + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> dict:
        idx = self.rng.integers(0, self.n + self.size, size=batch_size)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        online = {k: v[self.n : self.n + self.size] for k, v in self.data.items()}
        return dict(online=online, next=self.next, rng=self.rng.bit_generator.state)

    def load_state_dict(self, state: dict):
        for k, v in state["online"].items():
            self.data[k][self.n : self.n + len(v)] = v
        self.size, self.next, self.rng.bit_generator.state = len(state["online"]["rewards"]), state["next"], state["rng"]


def evaluate(agent: IQL, envs: list, seeds: np.ndarray, ref: tuple[float, float]) -> dict:
    """Deterministic episodes, stepped in lockstep with one batched forward per step; their mean score and return."""
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])
    returns, alive = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    while alive.any():
        actions = agent.act(obs, sample=False)
        for i in np.flatnonzero(alive):
            obs[i], reward, terminated, truncated, _ = envs[i].step(actions[i])
            returns[i] += reward
            alive[i] = not (terminated or truncated)
    scores = normalized_score(returns, *ref)
    sem = float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else 0.0
    return dict(normalized_score=float(scores.mean()), normalized_score_sem=sem, eval_return=returns.mean())


def train_episode_seed(seed: int, episode: int) -> int:
    """Reset seed of training episode `episode`, so a resumed run can rebuild the episode it was saved in."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


def check(args: Args) -> tuple[Args, str]:
    """The env family, its presets filled in; a one-line error for an input that would break the run."""
    family, _ = env_family(args.env_id)
    args = replace(args, **{k: v for k, v in zip(PRESET_FLAGS, PRESETS[family]) if getattr(args, k) is None})
    sizes = ("batch_size", "buffer_size", "hidden_dim", "max_episode_steps", "eval_every", "eval_episodes")
    nonnegative = ("offline_updates", "online_steps", "total_env_steps", "max_seconds", "save_every", "beta")
    check_args(args, sizes + ("actor_lr", "critic_lr"), nonnegative, unit=("expectile", "actor_dropout", "gamma", "tau"))
    return args, family


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


def main(args: Args) -> dict:
    args, saved = resume_args(args, BUDGET)
    args, family = check(args)
    device = seed_everything(args)
    run_name = saved["run_name"] if saved else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.runs_dir) / run_name
    state_path = Path(args.save_path or args.resume or run_dir / "state.pt")
    env, *eval_envs = (make_env(args.env_id, max_episode_steps=args.max_episode_steps) for _ in range(1 + args.eval_episodes))
    if args.capture_video:
        video_env = make_env(args.env_id, max_episode_steps=args.max_episode_steps, render_mode="rgb_array")
        eval_envs[0] = gym.wrappers.RecordVideo(video_env, f"videos/{run_name}")
    data = load_offline(args, family, env)
    agent = IQL(args, data, env.observation_space.shape[0], env.action_space.shape[0], device)
    buffer = ReplayBuffer(data["offline"], args.buffer_size, args.seed)
    parts = dict(agent=agent, optimizer=agent.optimizer, buffer=buffer)  # with the torch RNGs, all a resume needs
    writer = make_writer(args, run_name, purge_step=saved["counters"]["env_steps"] + 1 if saved else None)
    if args.save_every:
        print(f"run state: {state_path}")

    def non_finite(what: str) -> UserError:
        kept = f"last good state kept at {state_path}" if state_path.is_file() else "no state saved yet"
        return UserError(f"non-finite {what}; stopped, {kept}")

    def update(step: int, phase: str, actor_lr: float):  # one IQL update; its losses logged every 100 steps
        stats = agent.update(buffer.sample(args.batch_size), actor_lr)
        if not all(finite := torch.stack(list(stats.values())).isfinite().tolist()):
            raise non_finite(f"{list(stats)[finite.index(False)]} at {phase} step {step}")
        if step % 100 == 0:  # offline at update - offline_updates <= 0, before env step 1: a resume's purge never cuts it
            prefix, shift = ("offline", args.offline_updates) if phase == "offline" else ("losses", 0)
            for k, v in stats.items():
                writer.add_scalar(f"{prefix}/{k}", v.item(), step - shift)

    def log_eval(c: dict, done: bool, **scalars):  # an evaluation as charts/*, the run state saved on its beat
        charts = evaluate(agent, eval_envs, eval_seeds(args.seed, args.eval_episodes), data["ref"])
        c["score"] = charts["normalized_score"]
        tqdm.write(f"env step {c['env_steps']}: normalized score {c['score']:.2f}")
        charts.update(env_steps=c["env_steps"], grad_updates=args.offline_updates + c["env_steps"], **scalars)
        for k, v in charts.items():
            writer.add_scalar(f"charts/{k}", v, c["env_steps"])
        if args.save_every and (done or c["env_steps"] // args.eval_every % args.save_every == 0):
            state = dict(args=asdict(args), run_name=run_name, counters=c, torch_rng=torch.get_rng_state())
            state.update(cuda_rng=torch.cuda.get_rng_state_all(), **{k: part.state_dict() for k, part in parts.items()})
            state_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, f"{state_path}.tmp")
            os.replace(f"{state_path}.tmp", state_path)  # a kill mid-save never leaves a truncated state

    # ALGO LOGIC: offline IQL on the dataset, then "iteration 0", the evaluation every online curve starts from
    if saved is None:
        for step in tqdm(range(1, args.offline_updates + 1), desc="offline IQL", mininterval=2.0):
            update(step, "offline", args.actor_lr * (0.5 * (1.0 + np.cos(np.pi * (step - 1) / args.offline_updates))))
        counters = dict(env_steps=0, episode=0, episode_actions=[], episode_return=0.0)
        log_eval(counters, done=False)
        writer.add_scalar("offline/normalized_score", counters["score"], 0)
    else:
        for k, part in parts.items():
            part.load_state_dict(saved[k])
        counters = saved["counters"]
        torch.set_rng_state(saved["torch_rng"])
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
        print(f"resumed {args.resume} at env step {counters['env_steps']}")
    obs = env.reset(seed=train_episode_seed(args.seed, counters["episode"]))[0]
    for action in counters["episode_actions"]:  # back to where the saved run was in its episode
        obs = env.step(action)[0]

    # ALGO LOGIC: online finetuning, one env step then one update on the offline + online replay
    t_online, start = time.time(), counters["env_steps"]
    total = min(args.online_steps, args.total_env_steps or args.online_steps)
    with tqdm(total=total, initial=start, desc="online IQL", mininterval=2.0) as pbar:
        for env_steps in range(start + 1, total + 1):
            action = agent.act(obs[None], sample=True)[0]
            if not np.isfinite(action).all():
                raise non_finite(f"action at online step {env_steps}")
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(observations=obs, actions=action, rewards=reward, next_observations=next_obs, terminals=terminated)
            counters["episode_actions"].append(action)
            counters["episode_return"] += float(reward)
            counters["env_steps"], obs = env_steps, next_obs
            if terminated or truncated:
                writer.add_scalar("charts/episodic_return", counters["episode_return"], env_steps)
                counters.update(episode=counters["episode"] + 1, episode_actions=[], episode_return=0.0)
                obs = env.reset(seed=train_episode_seed(args.seed, counters["episode"]))[0]
            update(env_steps, "online", args.actor_lr)
            pbar.update()
            done = env_steps == total or 0 < args.max_seconds <= time.time() - t_online
            if done or env_steps % args.eval_every == 0:
                log_eval(counters, done, SPS=(env_steps - start) / (time.time() - t_online))
            if done:
                break
    if args.save_model:
        actor = dict(actor=agent.actor.state_dict(), state_mean=data["state_mean"], state_std=data["state_std"])
        torch.save({**actor, "args": asdict(args)}, run_dir / f"{args.exp_name}.pt")
    writer.close()
    print(f"{run_name}: {counters['env_steps']} online env steps, normalized score {counters['score']:.2f}")
    return dict(run_dir=run_dir, state_path=state_path, agent=agent, **counters)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        sys.exit(f"error: {e}")
