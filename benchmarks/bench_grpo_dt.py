"""Benchmarks of grpo_dt.py (print figures; never timed tests).

throughput: env-steps/s of GRPO-DT's grouped sub-trajectory rollouts (exact group resets, one batched policy
    forward per step) against raw `mujoco.mj_step` x frame_skip. The yardstick is the rollout's own physics: every
    `mj_step` call of the rollout (in this process and in each worker) is timed, so "raw per core" is the rate of bare
    mj_step on exactly the states and controls the rollout visits, and the efficiency is physics seconds / (cores x
    wall). The older yardstick, bare mj_step from a reset with zero ctrl, is printed beside it: a fallen hopper has
    more contacts, so that rate is 25-35% below the rollout's and it overstates the efficiency. Per --workers setting
    (0 = in-process, one core): the median of --repeats group collections, the cores' time split into physics /
    policy (this process's time outside env calls) / overhead or idle, and the targets of issue #15 (0.85
    in-process, 0.8 with 2 workers, 0.7 with 16). With the policy on the CPU it also prints the bound no schedule can
    pass: the cores must do at least the physics and the policy's matrix products (each timed on its own arguments,
    best of 10 at 256 and 512 members, after each collection), so the efficiency is at most physics / (physics + those).
    With workers the rollout is pipelined in --stages groups of workers: the policy (on --device; on CUDA one graph
    replay per stage and step, --cuda-graphs) acts for one group's members while the others step.
ipc: the main process's CPU time per lockstep step in `EnvPool.step_send` / `step_recv` (messages to and from the
    workers, not the physics) for 512 Hopper members at each --workers setting, --stages pipeline stages, 60 steps
    from reset states (restored every 10); the part of a step the policy process spends on the workers.
learn: a GRPO-DT run on local/hopper/medium-v0 from a pretrained checkpoint; prints the normalized score per
    iteration against the pretrained (iteration 0) score.

    MINARI_DATASETS_PATH=/work/shared/datasets python benchmarks/bench_grpo_dt.py throughput --checkpoint CKPT \
        --trajs-per-iter 16 --eval-len 400 --workers 0 2
    python benchmarks/bench_grpo_dt.py throughput --checkpoint CKPT --trajs-per-iter 16 --eval-len 400 \
        --workers 1 2 4 8 16 --device cuda      # a 16-core GPU machine
    python benchmarks/bench_grpo_dt.py ipc --workers 2 16
    MINARI_DATASETS_PATH=/work/shared/datasets python benchmarks/bench_grpo_dt.py learn --checkpoint CKPT --max-seconds 1200
"""

import math
import multiprocessing as mp
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mujoco
import numpy as np
import torch
import tyro
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo_dt  # noqa: E402


@dataclass
class Bench:
    mode: tyro.conf.Positional[Literal["throughput", "ipc", "learn"]]
    """what to measure"""
    checkpoint: str = "benchmarks/grpo_dt_out/hopper_cpu_pretrained.pt"
    """pretrained Hopper checkpoint (CPU-sized model)"""
    env_id: str = "Hopper-v4"
    """env of the checkpoint"""
    trajs_per_iter: int = 8
    """throughput/learn: trajectories drawn per iteration (x K=4 x G=8 group members)"""
    eval_len: int = 100
    """throughput/learn: L_eval (paper 400 for Hopper; shorter to fit a CPU)"""
    workers: tuple[int, ...] = (0, 2)
    """throughput: worker-process settings to time (0 = in-process); efficiency = env-steps/s / (N x raw per core)"""
    stages: int = 2
    """throughput: pipeline stages of the workers (grpo_dt --pipeline-stages; 0: one per worker)"""
    device: str = "cpu"
    """throughput: where the policy runs (cpu, cuda)"""
    cuda_graphs: bool = True
    """throughput: with --device cuda, replay each stage's policy step as a CUDA graph (grpo_dt --cuda-graphs)"""
    repeats: int = 3
    """throughput: group collections timed per worker setting, each right after a raw mj_step timing"""
    raw_steps: int = 10_000
    """throughput: env-steps of each raw mj_step timing"""
    max_seconds: float = 1200
    """learn: wall-clock budget of the run"""
    eval_episodes: int = 5
    """learn: deterministic evaluation episodes per iteration"""
    runs_dir: str = "benchmarks/grpo_dt_out/runs"
    """learn: TensorBoard root"""


class PhysicsClock:
    """Times every `mj_step` of grpo_dt's envs in CPU seconds, per process: grpo_dt's `mujoco` module is replaced by a
    proxy before the worker processes fork, and each process adds its seconds to a shared slot found by its pid (slot 0:
    this one)."""

    def __init__(self, slots: int = 65):
        self.pids, self.seconds = mp.RawArray("l", slots), mp.RawArray("d", slots)
        self.pid = self.pids[0] = os.getpid()
        self.slot = 0
        proxy = types.SimpleNamespace(**{k: getattr(mujoco, k) for k in dir(mujoco) if not k.startswith("__")})
        proxy.mj_step = self.mj_step
        grpo_dt.mujoco = proxy

    def mj_step(self, model, data, nstep=1):
        tic = time.thread_time()  # CPU time: a process preempted by another on a busy box is not charged
        mujoco.mj_step(model, data, nstep=nstep)
        elapsed = time.thread_time() - tic
        if self.pid != os.getpid():  # first call in this process (workers fork after register)
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


def raw_rate(env_id, n):
    """Env-steps/s of bare mj_step(nstep=frame_skip) on the env's own model and data from a reset, zero ctrl."""
    env = grpo_dt.make_env(env_id)
    env.reset(seed=0)
    sim = grpo_dt.sim_of(env)
    tic = time.perf_counter()
    for _ in range(n):
        mujoco.mj_step(sim.model, sim.data, nstep=sim.frame_skip)
    return n / (time.perf_counter() - tic)


def env_step_rate(env_id, n):
    """Env-steps/s of gymnasium's own env.step with zero actions: the ceiling of any loop that calls it."""
    env = grpo_dt.make_env(env_id)
    env.reset(seed=0)
    action = np.zeros(env.action_space.shape)
    tic = time.perf_counter()
    for _ in range(n):
        if any(env.step(action)[2:4]):
            env.reset()
    return n / (time.perf_counter() - tic)


class MatmulRecorder(TorchDispatchMode):
    """Records every matrix product torch runs under it (op and arguments), to be timed again on its own."""

    OPS = (torch.ops.aten.addmm, torch.ops.aten.mm, torch.ops.aten.bmm)

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.OPS:
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def policy_matmuls(model, c: int, rows: tuple[int, ...] = (256, 512), repeats: int = 10) -> tuple[float, float]:
    """(FLOPs, CPU seconds) per member of the matrix products in one CPU `policy_step` at context c: each product
    re-run on its own recorded arguments, best of `repeats`, at the cheapest per member of `rows` (a pipeline stage,
    the whole group; smaller batches cost more per member). What any rollout with this policy pays per env step even
    with no other work."""
    S, A = model.eval().embed_state.in_features, model.mean_head.out_features
    flops, best = 0.0, float("inf")
    for n in rows:
        window = (torch.zeros(n, c, 1), torch.randn(n, c, S), torch.zeros(n, c, A), torch.ones(n, c, dtype=bool))
        with torch.no_grad(), MatmulRecorder() as recorder:
            grpo_dt.policy_step(model, *window)
        flops = sum(2 * math.prod(args[-2].shape) * args[-1].shape[-1] for _, args, _ in recorder.calls) / n
        for _ in range(repeats):
            tic = time.thread_time()
            for func, args, kwargs in recorder.calls:
                func(*args, **kwargs)
            best = min(best, (time.thread_time() - tic) / n)
    return flops, best


def throughput(b: Bench):
    torch.set_num_threads(1)
    grpo_dt.fix_malloc_mmap_threshold()  # as grpo_dt.main does: the allocator's settings change the forward's cost
    if b.device not in ("cpu", "cuda") or (b.device == "cuda" and not torch.cuda.is_available()):
        sys.exit(f"error: --device must be cpu or cuda (cuda available: {torch.cuda.is_available()}), got {b.device!r}")
    if b.stages < 0:
        sys.exit(f"error: --stages must be >= 0 (0: one per worker), got {b.stages}")
    device = torch.device(b.device)
    model, ckpt = grpo_dt.load_model(b.checkpoint, device)
    args = grpo_dt.Args(env_id=b.env_id, dataset="medium", trajs_per_iter=b.trajs_per_iter, eval_len=b.eval_len)
    grpo_dt.apply_presets(args, *grpo_dt.env_family(b.env_id))
    n_members = args.trajs_per_iter * args.reset_points * args.group_size
    cfg = ckpt["model_config"]
    print(
        f"model: embed {cfg['embed_dim']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads; {n_members} group members, "
        f"L_traj {args.subtraj_len}, L_eval {args.eval_len}, c_online {args.c_online}; policy on {device}, "
        f"{os.cpu_count()} cores, pipeline stages {b.stages or 'one per worker'}"
        + (f", CUDA graphs {'on' if b.cuda_graphs else 'off'}" if device.type == "cuda" else "")
    )
    clock, cpu = PhysicsClock(), device.type == "cpu"
    for workers in b.workers:
        envs = grpo_dt.EnvPool(b.env_id, n_members, workers, b.stages)
        clock.register(envs.procs)
        actor = grpo_dt.Actor(
            model.eval(),
            ckpt["state_mean"].to(device),
            ckpt["state_std"].to(device),
            rtg_scale=ckpt["rtg_scale"],
            c=args.c_online,
            max_steps=1000,
            gen=torch.Generator(device=device).manual_seed(0),
            stage_graphs=b.cuda_graphs and device.type == "cuda",
        )
        rng = np.random.default_rng(0)
        out, params = grpo_dt.run_episodes(actor, envs, [1, 2], args.g_online, stochastic=True, record_sim=True)
        buffer = grpo_dt.store_trajectories(out, params, actor.rtg_scale)
        cores, rows = max(1, workers), []
        for _ in range(b.repeats):  # the zero-ctrl rate and the rollout alternate, so both see the same load
            zero_ctrl = raw_rate(b.env_id, b.raw_steps)
            envs.seconds = 0.0
            clock.take()
            tic = time.perf_counter()
            _, _, _, out = grpo_dt.collect_groups(actor, envs, buffer, args, rng)
            wall = time.perf_counter() - tic
            steps, physics = int(out["valid"].sum()), clock.take()
            raw = steps / physics  # bare mj_step on the rollout's own states, env-steps/s per core
            # this process's time outside env calls (the policy), as a share of all cores' time like the physics
            policy = (wall - envs.seconds) / wall / cores
            # the best any schedule could do: the cores do all the physics and at least the policy's matrix products
            # (one row per env step: live members only), with no other work; timed right after the collection
            flops_per_row, matmul_per_row = policy_matmuls(model, args.c_online) if cpu else (0.0, 0.0)
            floor = steps * matmul_per_row
            rows.append(
                (physics / cores / wall, steps / wall, raw, zero_ctrl, steps / wall / cores / zero_ctrl, policy)
                + (physics / (physics + floor), flops_per_row / max(matmul_per_row, 1e-12))
            )
        ratio, rate, raw, zero_ctrl, zero_ratio, policy, bound, gflops = np.median(np.array(rows), axis=0)
        ceiling = env_step_rate(b.env_id, b.raw_steps // 2) / raw_rate(b.env_id, b.raw_steps // 2)
        target = {0: 0.85, 2: 0.8, 16: 0.7}.get(workers)
        verdict = "" if target is None else f"; target {target}: {'met' if ratio >= target else 'NOT met'}"
        if cpu:
            verdict += (
                f"; bound with the policy's matrix products alone ({flops_per_row / 1e6:.2f} MFLOP per member step at "
                f"{gflops / 1e9:.0f} GFLOPS, this core's rate on their shapes) and nothing else: {bound:.2f}"
            )
        print(
            f"workers {workers or 'in-process'}: {rate:,.0f} env-steps/s, raw mj_step on the same states "
            f"{raw:,.0f}/s per core -> {ratio:.2f}x raw per core = efficiency (median of {b.repeats}: "
            f"{', '.join(f'{r[0]:.2f}' for r in rows)}; cores' time: physics {ratio:.0%}, policy {policy:.0%}, "
            f"overhead or idle {1 - ratio - policy:.0%}){verdict}; zero-ctrl yardstick {zero_ctrl:,.0f}/s -> "
            f"{zero_ratio:.2f}x; gymnasium env.step alone: {ceiling:.2f}x the zero-ctrl rate"
        )
        envs.close()


def ipc(b: Bench, n: int = 512, steps: int = 60):
    for workers in b.workers:
        envs = grpo_dt.EnvPool(b.env_id, n, workers, b.stages)
        idx = np.arange(n)
        envs.reset(idx, idx)
        states, elapsed = envs.get_states(idx)
        probe = grpo_dt.make_env(b.env_id)
        actions, send, recv = np.zeros((n, *probe.action_space.shape), np.float32), 0.0, 0.0  # float32, as the policy's
        probe.close()
        for t in range(steps):
            if t % 10 == 0:  # back to the reset states before the hoppers fall
                envs.restore(idx, np.full(n, {}, object), np.full(n, None, object), states, elapsed)
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


def learn(b: Bench):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = grpo_dt.Args(
        env_id=b.env_id,
        dataset="local/hopper/medium-v0",
        checkpoint=b.checkpoint,
        num_iterations=10_000,
        max_seconds=b.max_seconds,
        trajs_per_iter=b.trajs_per_iter,
        eval_len=b.eval_len,
        eval_episodes=b.eval_episodes,
        runs_dir=b.runs_dir,
        exp_name="bench_grpo_dt",
    )
    tic = time.time()
    grpo_dt.main(args)
    run = max(Path(b.runs_dir).glob(f"{b.env_id}__bench_grpo_dt__*"), key=lambda p: p.stat().st_mtime)
    acc = EventAccumulator(str(run))
    acc.Reload()
    score = {e.step: e.value for e in acc.Scalars("charts/normalized_score")}
    steps = {e.step: e.value for e in acc.Scalars("charts/env_steps")}
    print(f"\n{len(score) - 1} iterations in {time.time() - tic:.0f}s; pretrained score {score[0]:.1f}")
    print("| iteration | env steps | normalized score |\n|---|---|---|")
    for it in sorted(score):
        print(f"| {it} | {int(steps.get(it, 0))} | {score[it]:.1f} |")


if __name__ == "__main__":
    bench = tyro.cli(Bench)
    if min(bench.workers, default=0) < 0:
        sys.exit(f"error: --workers must be >= 0 (0 = in-process), got {' '.join(map(str, bench.workers))}")
    if bench.mode == "throughput":
        throughput(bench)
    elif bench.mode == "ipc":
        ipc(bench)
    else:
        learn(bench)
