"""Speed of GRPO-DT's rollouts in grpo_dt.py and grpo_dt_fast.py (prints figures; never a timed test).

throughput: env-steps/s of one iteration's group collection (exact resets, L_traj + L_eval steps per member, one
    batched policy forward per step) by grpo_dt.py in-process, and by grpo_dt_fast.py at each --workers setting
    (0: in-process). The yardstick is the rollout's own physics: every `mj_step` call (in this process and in each
    worker) is timed, so "raw" is bare mj_step's rate per core on exactly the states and controls the rollout visits,
    and "x raw" = env-steps/s / (cores x raw), the share of the cores' time that is physics. The median of --repeats.
ipc: the main process's CPU time per lockstep step in grpo_dt_fast's `EnvPool.step_send` / `step_recv` (the messages
    to and from the workers, not the physics) for 512 Hopper members at each --workers setting, 60 steps from resets.

    python benchmarks/bench_grpo_dt.py throughput --checkpoint CKPT --trajs-per-iter 16 --eval-len 400 --workers 0 2 16
    python benchmarks/bench_grpo_dt.py throughput --checkpoint CKPT --workers 16 --device cuda   # a GPU machine
    python benchmarks/bench_grpo_dt.py ipc --workers 2 16
"""

import multiprocessing as mp
import os
import sys
import time
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import gymnasium.envs.mujoco.mujoco_env
import mujoco
import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo_dt  # noqa: E402
import grpo_dt_fast  # noqa: E402


@dataclass
class Bench:
    mode: tyro.conf.Positional[Literal["throughput", "ipc"]]
    """what to measure"""
    checkpoint: str = "checkpoints/Hopper-v4__medium__s1__cpu.pt"
    """throughput: a pretrained checkpoint of --env-id (pretrain_dt.py)"""
    env_id: str = "Hopper-v4"
    """the env"""
    trajs_per_iter: int = 8
    """throughput: full trajectories drawn per iteration (x K=4 x G=8 group members)"""
    eval_len: int = 100
    """throughput: L_eval (Table 6: 400 for Hopper)"""
    workers: tuple[int, ...] = (0, 2)
    """grpo_dt_fast.py's worker-process settings to time (0: in-process)"""
    stages: int = 2
    """grpo_dt_fast.py's --pipeline-stages (0: one per worker)"""
    device: str = "cpu"
    """throughput: where the policy runs (cpu, cuda)"""
    cuda_graphs: bool = True
    """throughput: grpo_dt_fast.py's --cuda-graphs (with --device cuda)"""
    repeats: int = 3
    """throughput: group collections timed per setting"""


class PhysicsClock:
    """Times every `mj_step` of the envs in CPU seconds, per process: the `mujoco` module that gymnasium's MuJoCo envs
    and grpo_dt_fast's batched step call is replaced by a proxy before any env exists or worker forks, and each
    process adds its seconds to a shared slot found by its pid (slot 0: this one)."""

    def __init__(self, slots: int = 65):
        self.pids, self.seconds = mp.RawArray("l", slots), mp.RawArray("d", slots)
        self.pid = self.pids[0] = os.getpid()
        self.slot = 0
        proxy = types.SimpleNamespace(**{k: getattr(mujoco, k) for k in dir(mujoco) if not k.startswith("__")})
        proxy.mj_step = self.mj_step
        gymnasium.envs.mujoco.mujoco_env.mujoco = grpo_dt_fast.mujoco = proxy

    def mj_step(self, model, data, nstep=1):
        tic = time.thread_time()  # CPU time: a process preempted by another on a busy box is not charged
        mujoco.mj_step(model, data, nstep=nstep)
        elapsed = time.thread_time() - tic
        if self.pid != os.getpid():  # first call in a worker (they fork after `register`)
            self.pid = os.getpid()
            self.slot = list(self.pids).index(self.pid)
        self.seconds[self.slot] += elapsed

    def register(self, procs):
        for slot, proc in enumerate(procs, start=1):
            self.pids[slot] = proc.pid

    def take(self) -> float:
        total = sum(self.seconds)
        self.seconds[:] = [0.0] * len(self.seconds)
        return total


def throughput(b: Bench):
    clock, device = PhysicsClock(), torch.device(b.device)
    model, ckpt = grpo_dt.load_model(b.checkpoint, device)
    probe = grpo_dt.make_env(b.env_id)
    A, max_steps = probe.action_space.shape[0], probe.spec.max_episode_steps
    args = grpo_dt_fast.Args(env_id=b.env_id, trajs_per_iter=b.trajs_per_iter, eval_len=b.eval_len)
    args = replace(args, pipeline_stages=b.stages, cuda_graphs=b.cuda_graphs)
    grpo_dt.apply_presets(args, A, max_steps)
    n, cfg = args.trajs_per_iter * args.reset_points * args.group_size, ckpt["model_config"]
    print(
        f"{b.env_id}, DT {cfg['embed_dim']}x{cfg['n_layers']}, {n} group members, L_traj {args.subtraj_len}, L_eval "
        f"{args.eval_len}, c_online {args.c_online}; policy on {device}, {os.cpu_count()} cores, pipeline stages "
        f"{b.stages or 'one per worker'}"
        + (f", CUDA graphs {'on' if b.cuda_graphs else 'off'}" if device.type == "cuda" else "")
    )
    settings = [("grpo_dt.py in-process", grpo_dt.Envs, grpo_dt.rollout, 0)]
    settings += [(f"grpo_dt_fast.py {w or 'in-process'}", grpo_dt_fast.EnvPool, grpo_dt_fast.rollout, w) for w in b.workers]
    for name, make_envs, rollout, workers in settings:
        envs = make_envs(replace(args, num_workers=workers), n)
        clock.register(getattr(envs, "procs", []))
        gen = torch.Generator(device=device).manual_seed(0)
        policy = grpo_dt.Policy(
            model.eval(), ckpt["state_mean"].to(device), ckpt["state_std"].to(device), ckpt["rtg_scale"], 1.0, gen
        )
        obs, params = envs.reset(range(2), [1, 2])
        full = rollout(policy, envs, grpo_dt.start_windows(policy, obs, args.g_online, args.c_online), max_steps, 0, True)
        buffer = [{k: v[m, : full["valid"][m].sum()] for k, v in full.items()} | {"params": p} for m, p in enumerate(params)]
        rng, rows = np.random.default_rng(0), []
        for _ in range(b.repeats):
            clock.take()
            tic = time.perf_counter()
            out = grpo_dt.collect_groups(policy, envs, buffer, args, rng, rollout)[3]
            wall, steps, physics = time.perf_counter() - tic, int(out["valid"].sum()), clock.take()
            rows.append((steps / wall, steps / physics, physics / max(1, workers) / wall))
        rate, raw, ratio = np.median(np.array(rows), axis=0)
        print(
            f"{name}{' workers' if workers else ''}: {rate:,.0f} env-steps/s; raw mj_step on the same states {raw:,.0f}/s "
            f"per core -> {ratio:.2f}x raw per core ({', '.join(f'{r[2]:.2f}' for r in rows)})"
        )
        envs.close()


def ipc(b: Bench, n: int = 512, steps: int = 60):
    for workers in b.workers:
        envs = grpo_dt_fast.EnvPool(grpo_dt_fast.Args(env_id=b.env_id, num_workers=workers, pipeline_stages=b.stages), n)
        idx, probe = np.arange(n), grpo_dt.make_env(b.env_id)
        _, params = envs.reset(idx, idx)
        states, elapsed = envs.get_states(idx)
        actions, send, recv = np.zeros((n, *probe.action_space.shape), np.float32), 0.0, 0.0  # float32, as the policy's
        for t in range(steps):
            if t % 10 == 0:  # back to the reset states before the hoppers fall
                envs.restore(idx, [(p, None, s, e) for p, s, e in zip(params, states, elapsed)])
            for members in envs.stages(idx):
                tic = time.thread_time()
                ticket = envs.step_send(idx[members], actions[members])
                send += time.thread_time() - tic
                tic = time.thread_time()
                envs.step_recv(ticket)
                recv += time.thread_time() - tic
        print(
            f"workers {workers or 'in-process'} ({len(envs.stages(idx))} stages): main-process CPU per lockstep step "
            f"in step_send {send / steps * 1e3:.3f} ms, step_recv {recv / steps * 1e3:.3f} ms"
            + (" (in-process: the physics itself)" if not workers else "")
        )
        envs.close()


if __name__ == "__main__":
    bench = tyro.cli(Bench)
    if min(bench.workers, default=0) < 0 or bench.stages < 0:
        sys.exit("error: --workers and --stages must be >= 0")
    if bench.mode == "throughput":
        throughput(bench)
    else:
        ipc(bench)
