"""GRPO-DT, faster: grpo_dt.py's algorithm with its env steps and rollouts sped up, the same results on the CPU.

What it replaces (everything else is grpo_dt.py's): envs stepped in worker processes (--num-workers) with MuJoCo v4's
step batched over members (`MujocoStep`); a rollout pipelined over stages of workers (--pipeline-stages), the policy
acting for one stage's members while the others step, through a forward that skips what the next action does not need
(`policy_step`) and, with the policy on CUDA, one CUDA-graph replay per stage and step (--cuda-graphs); gradient updates
in chunks of at most --update-chunk-steps policy steps (memory). tests/test_grpo_dt_fast.py checks that a seeded CPU
run gives grpo_dt.py's groups and scores bit for bit, in-process and with workers.

Example:
    python grpo_dt_fast.py --env-id Hopper-v4 --dataset medium --num-workers 16
"""

import contextlib
import functools
import math
import multiprocessing as mp
import os
import pickle
import sys
from dataclasses import dataclass

import mujoco
import numpy as np
import torch
import torch.nn.functional as F
import tyro

import grpo_dt
from grpo_dt import Policy, check_args, make_env, squashed_logprob


@dataclass
class Args(grpo_dt.Args):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    num_workers: int = 0  # step the envs in this many worker processes (0: in this process); the same results
    pipeline_stages: int = 2  # pipeline stages of the workers (0: one per worker)
    cuda_graphs: bool = True  # with the policy on CUDA, replay each pipeline stage's policy step as a CUDA graph
    update_chunk_steps: int = 16384  # an update's max policy steps per chunk, gradients summed (0: one)


# ---------------------------------------------------------------- env steps
class MujocoStep:
    """gymnasium's `env.step` of MuJoCo v4 envs (Hopper, Walker2d, HalfCheetah, Ant without contact forces) for many
    members at once, bit for bit: per member the same `ctrl`, `mj_step` x frame_skip and `mj_rnePostConstraint` (so
    MjData ends up identical), then the v4 observation, reward and termination formulas in numpy over all members (same
    operations, same dtypes) and the TimeLimit counter; no wrapper stack, no per-env Python reward code. Adroit, AntMaze
    and v5 envs keep gymnasium's step (tests/test_fast_step.py checks both against plain `env.step`)."""

    FAMILIES = {"Hopper-v4": "hopper", "Walker2d-v4": "walker2d", "HalfCheetah-v4": "halfcheetah", "Ant-v4": "ant"}

    @classmethod
    def supports(cls, env_id: str) -> bool:
        return env_id in cls.FAMILIES

    def __init__(self, envs: list):
        u = envs[0].unwrapped
        self.key, self.limits = self.FAMILIES[u.spec.id], envs  # gym.make's outermost wrapper, the TimeLimit
        self.sims = [(e.unwrapped.model, e.unwrapped.data) for e in envs]
        self.views = [(d.qpos, d.qvel, d.ctrl, d.xipos) for _, d in self.sims]  # numpy views of each MjData, made once
        self.frame_skip, self.dt, self.u = u.frame_skip, u.dt, u
        self.torso = u.model.body("torso").id if self.key == "ant" else None
        if self.key == "ant" and u._use_contact_forces:
            raise ValueError("MujocoStep does not compute Ant's contact forces; use gymnasium's step")

    def step(self, idx, actions):
        n, m0 = len(idx), self.sims[0][0]
        qpos, qvel, x0 = np.empty((n, m0.nq)), np.empty((n, m0.nv)), np.empty((n, 2))
        elapsed = np.empty(n, np.int64)
        for j, i in enumerate(idx):
            model, data = self.sims[i]
            qp, qv, ctrl, xipos = self.views[i]
            x0[j] = xipos[self.torso, :2] if self.torso is not None else qp[0]
            ctrl[:] = actions[j]
            mujoco.mj_step(model, data, nstep=self.frame_skip)
            mujoco.mj_rnePostConstraint(model, data)
            qpos[j], qvel[j] = qp, qv
            if self.torso is not None:
                x0[j] = (xipos[self.torso, :2] - x0[j]) / self.dt
            limit = self.limits[i]
            limit._elapsed_steps += 1
            elapsed[j] = limit._elapsed_steps - limit._max_episode_steps
        ctrl_cost = self.u._ctrl_cost_weight * np.sum(np.square(actions), axis=1)  # in the actions' dtype, as gymnasium
        obs, reward, healthy = self.formulas(qpos, qvel, x0, ctrl_cost)
        terminated = ~healthy if getattr(self.u, "_terminate_when_unhealthy", False) else np.zeros(n, bool)
        return obs, reward, terminated, elapsed >= 0

    def formulas(self, qpos, qvel, x0, ctrl_cost):
        """(obs, reward, healthy) per member after the step: hopper_v4.py, walker2d_v4.py, half_cheetah_v4.py, ant_v4.py."""
        u, key = self.u, self.key
        skip = (2 if key == "ant" else 1) if u._exclude_current_positions_from_observation else 0
        if key == "ant":  # x0 holds the torso's xy velocity (its COM before the last substep's integration)
            state = np.concatenate([qpos, qvel], 1)
            healthy = np.isfinite(state).all(1) & (u._healthy_z_range[0] <= qpos[:, 2]) & (qpos[:, 2] <= u._healthy_z_range[1])
            alive = (healthy | u._terminate_when_unhealthy).astype(np.float64) * u._healthy_reward
            return np.concatenate([qpos[:, skip:], qvel], 1), (x0[:, 0] + alive) - ctrl_cost, healthy
        forward = u._forward_reward_weight * ((qpos[:, 0] - x0[:, 0]) / self.dt)
        if key == "halfcheetah":
            return np.concatenate([qpos[:, skip:], qvel], 1), forward - ctrl_cost, np.ones(len(qpos), bool)
        z, angle = qpos[:, 1], qpos[:, 2]
        healthy = (u._healthy_z_range[0] < z) & (z < u._healthy_z_range[1])
        healthy &= (u._healthy_angle_range[0] < angle) & (angle < u._healthy_angle_range[1])
        if key == "hopper":
            state = np.concatenate([qpos, qvel], 1)[:, 2:]
            healthy &= ((u._healthy_state_range[0] < state) & (state < u._healthy_state_range[1])).all(1)
        alive = (healthy | u._terminate_when_unhealthy).astype(np.float64) * u._healthy_reward
        obs = np.concatenate([qpos[:, skip:], np.clip(qvel, -10, 10)], 1)
        return obs, (forward + alive) - ctrl_cost, healthy


class FastEnvs(grpo_dt.Envs):
    """grpo_dt.Envs with MuJoCo v4's step batched over members where `MujocoStep` supports the env."""

    def __init__(self, args: grpo_dt.Args, n: int):
        super().__init__(args, n)
        self.fast = MujocoStep(self.envs) if MujocoStep.supports(args.env_id) else None

    def step(self, idx, actions):
        return self.fast.step(idx, actions) if self.fast else super().step(idx, actions)


STEP_OUT = ("obs", "reward", "terminated", "truncated")
STEP, STOP = b"S", b"Q"  # worker messages that are not pickles (a pickle starts with its protocol byte, 0x80)


def env_worker(conn, args, n, workers, shared):
    """Serve `FastEnvs` calls for n members (member i is this worker's env i // workers); a step reads its actions from
    and writes its results to `shared` arrays (indexed by member), the pipe carries only the member indices."""
    envs = FastEnvs(args, n)
    arrays = {k: np.frombuffer(raw, dtype).reshape(shape) for k, (raw, dtype, shape) in shared.items()}
    while (raw := conn.recv_bytes()) != STOP:
        if raw[:1] == STEP:  # a step: its action dtype's code, then the member indices as raw int64
            idx = np.frombuffer(raw, np.int64, offset=8)
            actions = arrays["actions"][idx].astype(np.dtype(raw[1:2].decode()))
            for k, v in zip(STEP_OUT, envs.step(idx // workers, actions)):
                arrays[k][idx] = v
            conn.send_bytes(b"")
        else:
            method, call_args = pickle.loads(raw)
            conn.send(getattr(envs, method)(*call_args))
    envs.close()


class EnvPool:
    """grpo_dt.Envs' methods over `FastEnvs` in this process (--num-workers 0) or dealt over worker processes (member i
    to worker i % workers), one pipe round trip per call and worker. Dealt, not sliced: a group's members share a reset
    point and tend to finish together, so contiguous slices would leave some workers idle while each lockstep step
    waits for the busiest. The workers form --pipeline-stages contiguous stages (`stages`)."""

    def __init__(self, args: Args, n: int):
        workers, self.graphs, self.conns, self.procs = args.num_workers, args.cuda_graphs, [], []
        self.local = None if workers else FastEnvs(args, n)
        self.worker_of = np.arange(n) % max(workers, 1)
        self.n_stages = min(args.pipeline_stages, workers) if args.pipeline_stages else workers
        self.stage_of = (np.arange(workers) * self.n_stages // max(workers, 1))[self.worker_of] if workers else None
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        shared, self.arrays = {}, {}
        if workers:  # step arguments and results live in shared memory, one row per member
            probe = make_env(args.env_id)
            S, A = probe.observation_space, probe.action_space.shape[0]
            probe.close()
            spec = {"actions": (np.float64, (n, A)), "obs": (S.dtype, (n, S.shape[0])), "reward": (np.float64, (n,))}
            spec.update(terminated=(np.bool_, (n,)), truncated=(np.bool_, (n,)))
            for k, (dtype, shape) in spec.items():
                raw = ctx.RawArray("b", int(np.prod(shape)) * np.dtype(dtype).itemsize)
                shared[k], self.arrays[k] = (raw, dtype, shape), np.frombuffer(raw, dtype).reshape(shape)
        for w in range(workers):
            parent, child = ctx.Pipe()
            size = int((self.worker_of == w).sum())
            self.procs.append(ctx.Process(target=env_worker, args=(child, args, size, workers, shared), daemon=True))
            self.procs[-1].start()
            self.conns.append(parent)

    def step(self, idx, actions):
        return self.step_recv(self.step_send(idx, actions))

    def step_send(self, idx, actions):
        """Start the step of members `idx` (with workers through the shared arrays, the actions exactly, as float64) and
        return a ticket for `step_recv`; meanwhile the caller may act for other workers' members."""
        if self.local:
            return self.local.step(idx, actions)
        idx, actions, sent = np.asarray(idx), np.asarray(actions), []
        self.arrays["actions"][idx] = actions
        owner = self.worker_of[idx]
        for w, conn in enumerate(self.conns):
            sel = idx[owner == w]
            if len(sel):
                conn.send_bytes(STEP + actions.dtype.char.encode().ljust(7) + sel.astype(np.int64).tobytes())
                sent.append(conn)
        return idx, sent

    def step_recv(self, ticket):
        """(obs, reward, terminated, truncated) of the step `ticket` started."""
        if self.local:
            return ticket
        idx, sent = ticket
        for conn in sent:
            conn.recv_bytes()
        return tuple(self.arrays[k][idx] for k in STEP_OUT)

    def stages(self, idx) -> list:
        """Positions in `idx` grouped by the stage of workers that holds them (one group in-process)."""
        if self.local:
            return [np.arange(len(idx))]
        stage = self.stage_of[np.asarray(idx, dtype=int)]
        return [g for g in (np.flatnonzero(stage == s) for s in range(self.n_stages)) if len(g)]

    def call(self, method, idx, *args):
        """`Envs.<method>(idx, *args)`, split over the workers that hold members `idx`; results in the order of idx."""
        idx = np.asarray(idx)
        if self.local:
            return getattr(self.local, method)(idx, *args)
        sent = []
        for w, conn in enumerate(self.conns):
            sel = np.flatnonzero(self.worker_of[idx] == w)
            if len(sel):
                conn.send((method, (idx[sel] // len(self.conns), *([a[j] for j in sel] for a in args))))
                sent.append((sel, conn))
        parts = [(sel, conn.recv()) for sel, conn in sent]
        if parts[0][1] is None:
            return None
        back = np.argsort(np.concatenate([sel for sel, _ in parts]))  # worker order -> caller order
        joined = ([x for _, p in parts for x in p[k]] for k in range(len(parts[0][1])))
        return tuple(np.stack(x)[back] if isinstance(x[0], np.ndarray | np.generic) else [x[i] for i in back] for x in joined)

    def __getattr__(self, method):
        return functools.partial(self.call, method)

    def close(self):
        for conn, proc in zip(self.conns, self.procs):
            conn.send_bytes(STOP)
            proc.join(timeout=5)
        if self.local:
            self.local.close()


# ---------------------------------------------------------------- policy steps
MIN_ROWS = 16  # grpo_dt.Policy pads CPU batches to this many rows


def policy_step(model, rtg, states, actions, pad_mask, pad_to: int = MIN_ROWS):
    """`model(...)`'s mean and log_std at the last state token, without the work nothing reads: the current action
    token (the last, seen by no state token) in every block, and in the last block the projection and MLP of every
    token but that state token. Bit for bit the full forward's in any batch of MIN_ROWS or more (the same matmul rows
    and elementwise ops), so a member's output does not depend on its batch. Smaller batches are padded to `pad_to`
    rows; below MIN_ROWS without padding (evaluation), on a GPU or with dropout on, it is the full forward."""
    B, T, _ = states.shape
    cpu_inference = states.device.type == "cpu" and not model.training
    if B < pad_to and cpu_inference:
        padded = (torch.cat([x, x[:1].expand(pad_to - B, *x.shape[1:])]) for x in (rtg, states, actions, pad_mask))
        return tuple(y[:B] for y in policy_step(model, *padded, pad_to=pad_to))
    if B < MIN_ROWS or not cpu_inference:
        return tuple(x[:, -1] for x in model(rtg, states, actions, pad_mask))
    tokens = torch.stack([model.embed_rtg(rtg), model.embed_state(states), model.embed_action(actions)], dim=2)
    x, n = model.embed_ln(tokens.reshape(B, 3 * T, -1)[:, :-1]), 3 * T - 1
    real = pad_mask.repeat_interleave(3, dim=1)[:, :-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    mask = ((causal & real[:, None, :]) | torch.eye(n, dtype=torch.bool, device=x.device))[:, None]
    for i, block in enumerate(model.blocks):
        E = x.shape[-1]
        qkv = block.qkv(block.ln1(x)).view(B, x.shape[1], 3, block.n_heads, E // block.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(*qkv, attn_mask=mask)
        if i == len(model.blocks) - 1:  # only the last state token goes on
            y, x = y[:, :, -1:], x[:, -1:]
        x = x + block.proj(y.transpose(1, 2).reshape(B, x.shape[1], E))
        x = x + block.mlp(block.ln2(x))
    return model.action_head(model.ln_f(x[:, -1]))


def window_step(policy: Policy, win, rtg, states, noise) -> dict:
    """One policy step on context windows (B, c, ...), in place: shift them by a step, write the current RTG and state,
    act with u = mean + sigma * noise and write a = tanh(u) as the current action token. The step's tokens and outputs."""
    for x in win:
        x.copy_(x.roll(-1, 1))
    win[0][:, -1, 0] = rtg
    win[1][:, -1] = states
    win[2][:, -1] = 0.0  # the current action token: filled below, seen by no state token
    win[3][:, -1] = True
    mean, log_std = policy_step(policy.model, *win, pad_to=MIN_ROWS if policy.pad else 1)
    log_std = log_std + math.log(policy.std_scale)
    u = mean + log_std.exp() * noise
    a = torch.tanh(u)
    win[2][:, -1] = a
    return {"rtg": rtg, "states": states, "actions": a, "u": u, "mean": mean, "log_std": log_std}


class StageGraph:
    """One pipeline stage's policy step for all of its members at fixed shapes (finished members are computed and not
    read), captured once per rollout as a CUDA graph and replayed every step: the eager step launches a hundred-odd
    small kernels whose launch latency, not arithmetic, bounds a GPU rollout. It owns the stage's context windows and
    records each step's tokens and outputs at step `t_dev` of its history. Off CUDA it runs eagerly."""

    def __init__(self, policy: Policy, win, rows, s_cur, rtg_cur, noise, t_dev, T: int):
        self.policy, self.s_cur, self.rtg_cur, self.noise, self.t_dev = policy, s_cur, rtg_cur, noise, t_dev
        self.rows = torch.as_tensor(rows, device=s_cur.device)
        self.win = [x[self.rows] for x in win]
        M, A = len(rows), noise.shape[1]
        shapes = {"rtg": (), "states": s_cur.shape[1:], "actions": (A,), "u": (A,), "mean": (A,), "log_std": (A,)}
        self.hist = {k: s_cur.new_zeros((T, M, *shape)) for k, shape in shapes.items()}
        self.graph = None
        if s_cur.is_cuda:  # warm up on a side stream (lazy inits), put the state back, then capture
            saved = [x.clone() for x in self.win]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            for x, y in zip(self.win, saved):
                x.copy_(y)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.actions = self.step()

    def step(self) -> torch.Tensor:
        """`window_step` for every member of the stage, recorded at step `t_dev`; the actions."""
        rows = self.rows
        step = window_step(self.policy, self.win, self.rtg_cur[rows], self.s_cur[rows], self.noise[rows])
        for k, v in step.items():
            self.hist[k].index_copy_(0, self.t_dev, v[None])
        return step["actions"]

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.actions


@contextlib.contextmanager
def deterministic_algorithms_off():
    """Rollouts run inference kernels and write rows by unique member indices, deterministic either way; torch's
    deterministic mode (--torch-deterministic) only slows them on a GPU, so it is off inside and restored after."""
    on, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(on, warn_only=warn_only)


@torch.inference_mode()
@deterministic_algorithms_off()
def rollout(policy: Policy, envs: EnvPool, win, n_sampled: int, n_mean: int, record_sim: bool = False, whole_stages=None):
    """grpo_dt.rollout, pipelined: the members of each stage of workers (`EnvPool.stages`) form a pipeline stage, and
    the policy acts for one stage while the other stages' physics runs. The same result whatever the workers and
    stages: the noise is drawn for all N members per step, and a member's policy output does not depend on the batch
    it is in. With `whole_stages` (default: --cuda-graphs with the policy on CUDA) each stage acts through a
    `StageGraph` (all its members, one CUDA graph replay per step on CUDA) instead of the step over its live members."""
    if isinstance(policy.model, grpo_dt.Reinformer):  # `policy_step` is the DT's forward
        raise grpo_dt.UserError("grpo_dt_fast.py finetunes DT checkpoints; finetune a Reinformer with grpo_dt.py")
    N, T, device, A = len(win[0]), n_sampled + n_mean, win[0].device, policy.model.mean_head.out_features
    s_cur, rtg_cur, alive, out = win[1][:, -1].clone(), win[0][:, -1, 0].clone(), np.ones(N, bool), {}
    win = [x.roll(1, 1) for x in win]  # the current step's slot first: `window_step` shifts it to the end
    host = {"reward": np.zeros((N, T)), "valid": np.zeros((N, T), bool)}
    if record_sim:
        host.update(sim=np.zeros((N, T, envs.get_states([0])[0].shape[1])), elapsed=np.zeros((N, T), np.int64))

    def act(t, s, live):
        """The actions of members `live` of stage s at step t, recorded, on the host."""
        if graphs:
            return checked(t, live, graphs[s]().cpu().numpy()[np.searchsorted(stages[s], live)])
        live_t = torch.as_tensor(live, device=device)
        live_win = [x[live_t] for x in win]  # only live members are forwarded
        step = window_step(policy, live_win, rtg_cur[live_t], s_cur[live_t], noise[live_t])
        for x, y in zip(win, live_win):
            x[live_t] = y
        if not out:  # recorded on the device, copied to the host once at the end
            out.update({k: v.new_zeros((N, T, *v.shape[1:])) for k, v in step.items()})
        for k, v in step.items():
            out[k][live_t, t] = v
        return checked(t, live, step["actions"].cpu().numpy())

    def checked(t, live, actions):
        if not np.isfinite(actions).all():
            raise FloatingPointError("action")
        if record_sim:
            host["sim"][live, t], host["elapsed"][live, t] = envs.get_states(live)
        return actions

    def observe(t, live, obs, rew, term, trunc):
        live_t = torch.as_tensor(live, device=device)
        host["reward"][live, t], host["valid"][live, t] = rew, True
        s_cur[live_t] = policy.norm(obs)
        rtg_cur[live_t] -= torch.as_tensor(rew * policy.rtg_scale, dtype=torch.float32, device=device)
        alive[live] = ~(term | trunc)

    stages, in_flight = envs.stages(np.arange(N)), {}  # stage -> (step, members, ticket) of its step under way
    noise, t_dev = torch.zeros((N, A), device=device), torch.zeros(1, dtype=torch.long, device=device)
    whole_stages = envs.graphs and device.type == "cuda" if whole_stages is None else whole_stages
    graphs = [StageGraph(policy, win, m, s_cur, rtg_cur, noise, t_dev, T) for m in stages] if whole_stages else []
    for t in range(T):
        if t < n_sampled:  # drawn for all N members, whatever the stages
            noise.normal_(generator=policy.gen)
        elif t == n_sampled:
            noise.zero_()
        if graphs:
            t_dev.fill_(t)
        for s, members in enumerate(stages):
            if s in in_flight:
                step_t, live, ticket = in_flight.pop(s)
                observe(step_t, live, *envs.step_recv(ticket))
            live = members[alive[members]]
            if len(live):
                in_flight[s] = (t, live, envs.step_send(live, act(t, s, live)))
        if not in_flight:
            break
    for step_t, live, ticket in in_flight.values():
        observe(step_t, live, *envs.step_recv(ticket))
    valid = torch.as_tensor(host["valid"], device=device)
    if graphs:  # the stages' histories, with the steps of finished members zeroed as the masked step leaves them
        for g in graphs:
            for k, v in g.hist.items():
                out.setdefault(k, v.new_zeros((N, T, *v.shape[2:])))[g.rows] = v.transpose(0, 1)
        out.update({k: torch.where(valid.view(N, T, *[1] * (v.dim() - 2)), v, 0.0) for k, v in out.items()})
    mean, log_std = out.pop("mean"), out.pop("log_std")  # all steps at once, as grpo_dt.rollout
    stats = {"logp": squashed_logprob(mean, log_std, out["u"]), "var": (2 * log_std).exp().mean(-1)}
    out.update({k: torch.where(valid, v, 0.0) for k, v in stats.items()})
    return {k: v.cpu().numpy() for k, v in out.items()} | host


# ---------------------------------------------------------------- updates in chunks
def chunked_backward(model, ref_model, batch, args: Args, kappa):
    """grpo_dt.grpo_backward in chunks of whole sub-trajectories of at most --update-chunk-steps policy steps
    (--full-trajectory's 256 x 1000 steps would hold ~20 GB of activations at once). Each chunk's surrogate is weighted
    by its share of the sub-trajectories, its KL and entropy by its share of the real steps, so the chunks' gradients
    add up to the whole batch's."""
    valid = batch["valid"]
    (n_items, L), n_steps = valid.shape, valid.sum().item()
    size = max(1, args.update_chunk_steps // L) if args.update_chunk_steps else n_items
    if size >= n_items:
        return grpo_dt.grpo_backward(model, ref_model, batch, args, kappa)
    terms, ratios, clips = {"policy_loss": 0.0, "kl": 0.0, "entropy": 0.0}, [], []
    for rows in valid.sum(1).argsort(stable=True).split(size):  # chunks of similar lengths, cut after their last real step
        chunk = {k: v[rows] for k, v in batch.items()}
        cut = L - int(chunk["valid"].any(0).nonzero().max()) - 1 if chunk["valid"].any() else 0
        chunk = {k: v[:, : v.shape[1] - cut] if v.dim() > 1 else v for k, v in chunk.items()}
        pg_loss, kl, entropy, ratio, clipped, _ = grpo_dt.grpo_objective(model, ref_model, chunk, args)
        step_share = chunk["valid"].sum().item() / n_steps
        pg_loss, kl, entropy = pg_loss * (len(rows) / n_items), kl * step_share, entropy * step_share
        loss = pg_loss + args.kl_coef * kl - kappa * entropy
        if not torch.isfinite(loss):
            raise FloatingPointError("loss")
        loss.backward()
        for k, v in zip(terms, (pg_loss, kl, entropy)):
            terms[k] = terms[k] + v.detach()
        ratios.append(F.pad(ratio, (0, cut), value=1.0) if ratio.dim() == 2 else ratio)
        clips.append(clipped)
    ratio, stats = torch.cat(ratios), {k: float(v) for k, v in terms.items()}
    stats |= dict(clipfrac=torch.cat(clips).mean().item(), kappa=float(kappa), ratio_mean=ratio.mean().item())
    return terms["entropy"], stats | {"ratio_max": ratio.max().item()}


def main(args: Args) -> float:
    check_args(args, nonnegative=("num_workers", "pipeline_stages", "update_chunk_steps"))
    return grpo_dt.main(args, make_envs=EnvPool, rollout=rollout, backward=chunked_backward)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except grpo_dt.UserError as e:
        sys.exit(f"error: {e}")
