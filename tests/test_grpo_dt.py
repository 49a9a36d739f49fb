"""Tests of grpo_dt.py: exact resets, group consistency, Eq. 2/3 pieces, active sampling, end to end, kill/resume."""

import copy
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro
from conftest import ROOT, check_checkpoint_loads

import grpo_dt

TINY = dict(
    n_batch=8,
    trajs_per_iter=2,
    reset_points=2,
    group_size=2,
    subtraj_len=3,
    eval_len=5,
    updates_per_iter=2,
    eval_episodes=1,
    max_episode_steps=40,
)


def tiny_args(env_id, dataset, checkpoint, tmp_path, **kw):
    return grpo_dt.Args(
        env_id=env_id,
        dataset=dataset,
        checkpoint=str(checkpoint),
        runs_dir=str(tmp_path / "runs"),
        **{"num_iterations": 2, **TINY, **kw},
    )


def with_(args, **kw):
    return dataclasses.replace(args, **kw)


def scalars(runs_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = list(Path(runs_dir).iterdir())
    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------- exact resets
@pytest.mark.parametrize("env_id", ["Hopper-v4", "AdroitHandDoor-v1", "AntMaze_UMaze-v4"])
@pytest.mark.parametrize("at_start", [False, True])
def test_reset_replay_is_exact(env_id, at_start):
    """Record a state in member 0, step fixed actions, restore the state into member 1 (another episode), replay."""
    n, warmup = 25, 6
    envs = grpo_dt.Envs(env_id, 2, max_episode_steps=warmup + 1 + n)  # the replay ends exactly at the time limit
    rng = np.random.default_rng(0)
    A = envs.envs[0].action_space.shape[0]
    _, params = envs.reset([0, 1], [3, 4])
    other = grpo_dt.episode_params(envs.envs[1], envs.family)
    if envs.family != "mujoco":  # the other member really is in a different episode: params must be restored
        assert any(not np.allclose(params[0][k], other[k]) for k in other if k not in ("qpos", "qvel"))
    prev = None
    if not at_start:
        for _ in range(warmup):
            envs.step([0], rng.uniform(-1, 1, (1, A)))
        prev = envs.get_states([0])[0][0]
        envs.step([0], rng.uniform(-1, 1, (1, A)))
    state, elapsed = envs.get_states([0])
    actions = rng.uniform(-1, 1, (n, 1, A))
    first = [envs.step([0], a) for a in actions]
    prevs = np.empty(1, object)
    prevs[0] = prev
    restored, restored_elapsed = envs.restore([1], params[:1], prevs, state, elapsed)
    np.testing.assert_array_equal(restored, state)
    assert restored_elapsed[0] == elapsed[0] == (0 if at_start else warmup + 1)
    second = [envs.step([1], a) for a in actions]
    for (o1, r1, te1, tr1), (o2, r2, te2, tr2) in zip(first, second):
        assert np.abs(o1 - o2).max() <= 1e-9 and np.abs(r1 - r2).max() <= 1e-9
        assert te1 == te2 and tr1 == tr2
    if not at_start and not first[-1][2][0]:
        assert first[-1][3][0] and second[-1][3][0]  # the TimeLimit counter came back with the state


# ---------------------------------------------------------------- pipeline pieces on a real checkpoint
@pytest.fixture(scope="module")
def hopper_setup(hopper_checkpoint):
    model, ckpt = grpo_dt.load_model(hopper_checkpoint)
    args = grpo_dt.Args(
        env_id="Hopper-v4",
        dataset="local/hopper/medium-v0",
        c_online=3,
        delta_r=-1.0,
        gamma=0.99,
        narrow_exploration=False,
        **{**TINY, "group_size": 4, "eval_len": 4},
    )
    grpo_dt.apply_presets(args, "mujoco", "hopper")
    envs = grpo_dt.EnvPool("Hopper-v4", 16, max_episode_steps=40)
    scale = ckpt["rtg_scale"]
    actor = grpo_dt.Actor(
        model.eval(),
        ckpt["state_mean"],
        ckpt["state_std"],
        rtg_scale=scale,
        c=3,
        max_steps=40,
        gen=torch.Generator().manual_seed(0),
    )
    rng = np.random.default_rng(0)
    out, params = grpo_dt.run_episodes(actor, envs, [1, 2], args.g_online, stochastic=True, record_sim=True)
    trajs = grpo_dt.store_trajectories(out, params, scale)
    return dict(model=model, actor=actor, ckpt=ckpt, args=args, envs=envs, norm=actor.norm, scale=scale, rng=rng, trajs=trajs)


def collect(s, **kw):
    """collect_groups on the fixture's trajectories, with Args fields overridden."""
    return grpo_dt.collect_groups(s["actor"], s["envs"], s["trajs"], with_(s["args"], **kw), s["rng"])


def test_checkpoint_loads_with_dropout_off(hopper_checkpoint):
    model, ckpt = grpo_dt.load_model(hopper_checkpoint)
    assert all(b.dropout == 0 for b in model.blocks)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    check_checkpoint_loads(grpo_dt.load_model, hopper_checkpoint)


@pytest.mark.parametrize("c", [1, 3])
def test_policy_step_is_the_full_forward_bit_for_bit(hopper_checkpoint, c):
    """The rollout's pruned forward gives the full forward's last-token outputs exactly, with left padding, at every
    batch size a rollout meets (members finish one by one), for this checkpoint and the README's CPU model; the full
    forward runs on a larger batch (64 more rows), so a member's output also does not depend on its batch."""
    readme = ROOT / "benchmarks" / "grpo_dt_out" / "readme_cpu_pretrained_s1.pt"
    g = torch.Generator().manual_seed(c)
    for path in [hopper_checkpoint] + ([readme] if readme.exists() else []):
        model = grpo_dt.load_model(path)[0].eval()
        S, A = model.embed_state.in_features, model.mean_head.out_features
        with torch.inference_mode():
            for B in [*range(1, 40), 63, 64, 65, 255, 256, 511, 512, 600]:
                win = [torch.randn(B, c, 1, generator=g), torch.randn(B, c, S, generator=g)]
                win += [torch.randn(B, c, A, generator=g), torch.rand(B, c, generator=g) > 0.3]
                win[2][:, -1], win[3][:, -1] = 0.0, True
                extra = [
                    torch.randn(64, *x.shape[1:], generator=g) if x.dtype != torch.bool else x[:1].expand(64, -1) for x in win
                ]
                full = [x[:B, -1] for x in model(*(torch.cat([x, e]) for x, e in zip(win, extra)))]
                for a, b in zip(full, grpo_dt.policy_step(model, *win)):
                    assert torch.equal(a, b), (path.name, B)
                if B < grpo_dt.MIN_ROWS:  # unpadded (evaluation): the full forward on this very batch
                    for a, b in zip(model(*win), grpo_dt.policy_step(model, *win, pad_to=1)):
                        assert torch.equal(a[:, -1], b), (path.name, B)


def test_rollout_rtg_tokens_are_the_ones_used(hopper_setup):
    s = hopper_setup
    for t in s["trajs"]:
        expected = s["args"].g_online * s["scale"] - s["scale"] * np.concatenate([[0.0], np.cumsum(t["reward"])[:-1]])
        np.testing.assert_allclose(t["rtg"], expected, rtol=1e-5, atol=1e-4)


def test_group_members_start_identically_and_replay_the_trajectory(hopper_setup):
    s = hopper_setup
    G = s["args"].group_size
    items, rewards, keep, out = collect(s)
    assert keep.all() and rewards.shape == (4, G)

    def groups(x):
        return x.reshape(-1, G, *x.shape[1:])

    c = s["args"].c_online
    for k, n in (("rtg", c), ("states", c), ("mask", c), ("actions", c - 1)):  # reset context + first RTG/state
        first = groups(items[k][:, :n])
        assert (first == first[:, :1]).all(), k
    acts = groups(out["actions"][:, 0])
    assert (np.abs(acts - acts[:, :1]).max(-1) > 0).sum() > 0  # members then sample different actions
    # RTG tokens stored for training are exactly the rollout's (no relabeling)
    np.testing.assert_array_equal(items["rtg"][:, s["args"].c_online - 1 :, 0], out["rtg"][:, :3])
    # Deterministic policy from the same reset points: every member of a group follows the same path
    _, rewards_det, _, out_det = collect(s, subtraj_len=0, eval_len=6)
    np.testing.assert_array_equal(rewards_det, rewards_det[:, :1].repeat(G, 1))
    states = groups(out_det["states"])
    np.testing.assert_array_equal(states, states[:, :1].repeat(G, 1))


def test_restored_members_replay_stored_trajectory(hopper_setup):
    s = hopper_setup
    t = max(s["trajs"], key=lambda t: len(t["reward"]))
    h = 2
    n = len(t["reward"]) - h - 1
    assert n >= 3
    prev = np.empty(3, object)
    prev[:] = [t["sim"][h - 1]] * 3
    params = np.empty(3, object)
    params[:] = [t["params"]] * 3
    s["envs"].restore([4, 5, 6], params, prev, np.stack([t["sim"][h]] * 3), np.array([t["elapsed"][h]] * 3))
    for j in range(n):
        obs, rew, _, _ = s["envs"].step([4, 5, 6], np.repeat(t["actions"][h + j][None], 3, 0))
        np.testing.assert_allclose(rew, t["reward"][h + j], atol=1e-9, rtol=0)
        np.testing.assert_allclose(s["norm"](obs).numpy(), np.repeat(t["states"][h + j + 1][None], 3, 0), atol=1e-5)


@pytest.mark.parametrize("std_scale", [1.0, 0.5])
def test_sequence_ratio_is_one_before_update_and_kl_zero(hopper_setup, std_scale):
    s = {**hopper_setup, "actor": dataclasses.replace(hopper_setup["actor"], std_scale=std_scale)}
    items, *_ = collect(s, eval_len=2)
    buf = grpo_dt.SubtrajBuffer(64, "cpu")
    buf.add(items)
    batch = buf.sample(16, s["rng"])
    ref = copy.deepcopy(s["model"])
    args = with_(s["args"], clip_coef=0.2, kl_coef=1e-3, std_scale=std_scale)
    _, stats = grpo_dt.grpo_backward(s["model"], ref, batch, args, 0.1)
    assert abs(stats["ratio_mean"] - 1) < 1e-4 and abs(stats["ratio_max"] - 1) < 1e-4 and stats["clipfrac"] == 0
    assert stats["kl"] == 0.0
    with torch.no_grad():
        ref.mean_head.bias.add_(0.3)
    _, stats = grpo_dt.grpo_backward(s["model"], ref, batch, args, 0.1)
    assert stats["kl"] > 1e-3


@pytest.mark.parametrize("ratio", ["sequence", "token"])
def test_update_chunks_add_up_to_the_whole_batch(hopper_setup, ratio, monkeypatch):
    """--update-chunk-steps (memory) splits a gradient update into chunks of whole sub-trajectories, each weighted by
    its share of sub-trajectories (surrogate) and of real steps (KL, entropy): the same gradient and stats as one
    chunk, here with uneven chunks and sub-trajectories of different lengths. Entropy is a one-sample estimate, so
    kappa is 0 and its stat is left out."""
    s = hopper_setup
    items, *_ = collect(s, eval_len=2)
    buf = grpo_dt.SubtrajBuffer(64, "cpu")
    buf.add({**items, "born": np.arange(len(items["adv"])) % 2})
    # float64: chunked and whole agree up to the order of the sums
    batch = {k: v.double() if v.is_floating_point() else v for k, v in buf.sample(16, s["rng"]).items()}
    batch["valid"][::3, -1] = False  # sub-trajectories of 2 and 3 real steps
    batch["adv"][:8] *= -1  # both advantage signs
    ref, moved = copy.deepcopy(s["model"]).double(), copy.deepcopy(s["model"]).double()
    with torch.no_grad():
        moved.mean_head.bias.add_(0.05)
    calls = []  # each chunk's steps: a chunk is cut after its last real step
    real = grpo_dt.grpo_objective
    monkeypatch.setattr(grpo_dt, "grpo_objective", lambda *a, **kw: calls.append(a[2]["valid"].shape[1]) or real(*a, **kw))

    def grad_and_stats(chunk_steps):
        model = copy.deepcopy(moved)
        args = with_(s["args"], clip_coef=0.5, kl_coef=0.1, ratio=ratio, update_chunk_steps=chunk_steps)
        _, stats = grpo_dt.grpo_backward(model, ref, batch, args, 0.0, iteration=1)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), stats

    whole, whole_stats = grad_and_stats(0)
    L = batch["valid"].shape[1]
    assert calls == [L]
    real_steps = sorted(batch["valid"].sum(1).tolist())  # chunks run shortest first
    assert real_steps[0] < L
    for n in (1, 3):
        calls.clear()
        grad, stats = grad_and_stats(n * L + 1)
        assert calls == [max(real_steps[i : i + n]) for i in range(0, 16, n)]
        torch.testing.assert_close(grad, whole, rtol=1e-9, atol=1e-12)
        for k in whole_stats.keys() - {"entropy"}:
            assert stats[k] == pytest.approx(whole_stats[k], rel=1e-6, nan_ok=True), k  # float32 fractions
    assert 0 < whole_stats["clipfrac"] < 1 and whole_stats["kl"] > 0


def test_one_update_moves_log_probs_in_the_advantage_direction(hopper_setup):
    """Learning direction: one small Eq. 3 step (surrogate only: no KL, no entropy) on a sub-trajectory with a known
    advantage sign raises its log pi when A > 0 and lowers it when A < 0; on a mixed batch sum_i A_i dlog pi_i > 0."""
    s = hopper_setup
    items, *_ = collect(s, eval_len=2)
    n = len(items["adv"])
    items["adv"] = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)  # known signs
    buf = grpo_dt.SubtrajBuffer(64, "cpu")
    buf.add(items)

    def logp_change(rows):
        # float64 and a tiny step of fixed length along the gradient: the first-order regime, whatever sigma is
        batch = {k: v[rows].double() if v.is_floating_point() else v[rows] for k, v in buf.data.items()}
        model = copy.deepcopy(s["model"]).double()

        def seq_logp():
            with torch.no_grad():
                mean, log_std = grpo_dt.subtraj_policy(model, batch, s["args"].c_online, s["args"].std_scale)
                return (grpo_dt.squashed_logprob(mean, log_std, batch["u"]) * batch["valid"]).sum(1)

        before = seq_logp()
        args = with_(s["args"], clip_coef=0.2, kl_coef=0.0)
        grpo_dt.grpo_backward(model, copy.deepcopy(model), batch, args, 0.0)
        grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
        with torch.no_grad():
            for p in model.parameters():
                p -= 1e-7 * p.grad / grad_norm
        return seq_logp() - before, batch["adv"]

    for i in range(min(n, 6)):
        change, adv = logp_change([i])
        assert torch.sign(change).item() == torch.sign(adv).item(), (i, change, adv)
    # a mixed batch shares one parameter step, so single items may conflict; the advantage-weighted change cannot
    change, adv = logp_change(list(range(n)))
    assert (adv * change).mean() > 0


def test_std_scale_scales_the_sampled_noise_and_every_log_prob(hopper_setup):
    """--std-scale s: a sampled step draws u = mean + s sigma eps, and its recorded sigma and log-prob are those of
    N(mean, (s sigma)^2) squashed; the same noise eps at every scale."""
    s = hopper_setup
    state0, rtg0 = torch.zeros(4, 11), torch.full((4,), 0.5)
    prefix = [torch.zeros(4, 0, 1), torch.zeros(4, 0, 11), torch.zeros(4, 0, 3), torch.zeros(4, 0, dtype=torch.bool)]
    with torch.no_grad():  # the first step's window: rtg0, state0, an empty action slot
        mean, log_std = grpo_dt.policy_step(
            s["model"], rtg0[:, None, None], state0[:, None], torch.zeros(4, 1, 3), torch.ones(4, 1, dtype=torch.bool)
        )
    eps = {}
    for scale in (1.0, 0.25):
        s["envs"].reset(np.arange(4), [5, 6, 7, 8])
        actor = dataclasses.replace(s["actor"], c=1, std_scale=scale, gen=torch.Generator().manual_seed(3))
        out = grpo_dt.rollout(actor, s["envs"], np.arange(4), state0, rtg0, prefix, 1, 0)
        u, sigma = torch.as_tensor(out["u"][:, 0]), scale * log_std.exp()
        np.testing.assert_allclose(out["sigma"][:, 0], sigma.mean(-1).numpy(), rtol=1e-5)
        expected = grpo_dt.squashed_logprob(mean, log_std + np.log(scale), u)
        np.testing.assert_allclose(out["logp"][:, 0], expected.numpy(), rtol=1e-4, atol=1e-4)
        eps[scale] = ((u - mean) / sigma).numpy()
    np.testing.assert_allclose(eps[0.25], eps[1.0], atol=1e-4)


def test_rollouts_leave_deterministic_mode_as_they_found_it(hopper_setup):
    """Rollouts run with torch's deterministic algorithms off (they slowed the GPU policy step 2x) and give the same
    episodes as with them on; the caller's setting (on, warn-only) is restored after, also when the rollout raises."""
    s = hopper_setup
    runs, before = [], (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        for mode in (False, True):
            torch.use_deterministic_algorithms(mode, warn_only=mode)
            actor = dataclasses.replace(s["actor"], gen=torch.Generator().manual_seed(5))
            runs.append(grpo_dt.run_episodes(actor, s["envs"], [7, 8], 7200, stochastic=True)[0])
            assert torch.are_deterministic_algorithms_enabled() == mode
            assert torch.is_deterministic_algorithms_warn_only_enabled() == mode
        for k in runs[0]:
            np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)
        with pytest.raises(RuntimeError):
            with grpo_dt.deterministic_algorithms_off():
                assert not torch.are_deterministic_algorithms_enabled()
                raise RuntimeError
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_pipeline_stages_group_the_workers():
    """Members are dealt to the workers (member i to worker i % workers, so a group's members, which tend to finish
    together, spread over all of them) and --pipeline-stages S splits the workers into S contiguous stages (0, or
    more than the workers: one per worker); each stage holds its workers' members, in order."""
    envs = {s: grpo_dt.EnvPool("Hopper-v4", 12, 4, s, max_episode_steps=5) for s in (0, 2, 9)}
    try:
        idx = np.arange(12)
        assert envs[2].worker_of.tolist() == [0, 1, 2, 3] * 3
        assert [g.tolist() for g in envs[2].stages(idx)] == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]
        assert [g.tolist() for g in envs[0].stages(idx)] == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
        assert [g.tolist() for g in envs[9].stages(idx)] == [g.tolist() for g in envs[0].stages(idx)]
        assert [g.tolist() for g in envs[2].stages(np.array([1, 7, 8]))] == [[0, 2], [1]]  # positions in idx
    finally:
        for e in envs.values():
            e.close()


def test_pipelined_workers_roll_out_bit_exactly_as_in_process(hopper_setup):
    """With env workers the rollout is pipelined (the policy acts for one stage's members while the other stages
    step); sampled and mean-action episodes, with members finishing at different steps, are bit-identical to
    in-process stepping with one stage per worker (2 workers) and with 2 stages of 3 workers: the same noise, the
    same policy rows at every batch size, the same physics. So is the whole-stage step of --cuda-graphs (run eagerly
    on the CPU: finished members computed and not read), in-process and in 2 stages."""
    s, n = hopper_setup, 40
    runs = []
    for workers, stages, whole in ((0, 0, False), (2, 0, False), (3, 2, False), (0, 0, True), (3, 2, True)):
        envs = grpo_dt.EnvPool("Hopper-v4", n, workers, stages, max_episode_steps=40)
        try:
            actor = dataclasses.replace(s["actor"], gen=torch.Generator().manual_seed(3), stage_graphs=whole)
            seeds = np.arange(n) + 100
            runs.append(
                [grpo_dt.run_episodes(actor, envs, seeds, 7200, stochastic=st, record_sim=True)[0] for st in (True, False)]
            )
        finally:
            envs.close()
    for pooled_runs in runs[1:]:
        for local, pooled in zip(runs[0], pooled_runs):
            assert local.keys() == pooled.keys()
            for k in local:
                np.testing.assert_array_equal(local[k], pooled[k], err_msg=k)
    lengths = runs[0][0]["valid"].sum(1)
    assert lengths.min() < lengths.max()  # members finished at different steps, so batches shrank unevenly


def test_cuda_graphs_act_only_with_the_policy_on_cuda(hopper_checkpoint):
    """--cuda-graphs (the default) makes the actor replay whole-stage CUDA graphs only where the policy is on CUDA;
    on the CPU the masked step runs, and a whole-stage step built there runs eagerly (no graph)."""
    for flag in (True, False):
        envs, actor, _ = grpo_dt.setup(grpo_dt.Args(checkpoint=str(hopper_checkpoint), **TINY, cuda_graphs=flag))
        envs.close()
        assert actor.gen.device.type == "cpu" and actor.stage_graphs is False
    win = [torch.zeros(4, 1, 1), torch.zeros(4, 1, 11), torch.zeros(4, 1, 3), torch.zeros(4, 1, dtype=torch.bool)]
    stage = grpo_dt.StageGraph(
        actor,
        win,
        np.array([1, 3]),
        torch.ones(4, 11),
        torch.ones(4),
        torch.zeros(4, 3),
        torch.zeros(1, dtype=torch.long),
        T=2,
    )
    assert stage.graph is None and stage().shape == (2, 3) and stage.hist["states"][0].eq(1).all()


def test_whole_stage_step_collects_the_same_groups(hopper_setup):
    """collect_groups from restored mid-episode states with c_online 3 (real context windows, not zeros): the
    whole-stage step of --cuda-graphs (eager on the CPU) gives the masked step's buffer items, rewards and keep mask,
    bit for bit."""
    s, runs = hopper_setup, []
    for whole in (False, True):
        actor = dataclasses.replace(s["actor"], gen=torch.Generator().manual_seed(4), stage_graphs=whole)
        runs.append(grpo_dt.collect_groups(actor, s["envs"], s["trajs"], s["args"], np.random.default_rng(4)))
    (items, rewards, keep, out), (items_w, rewards_w, keep_w, out_w) = runs
    assert items.keys() == items_w.keys() and out.keys() == out_w.keys()
    for k in items:
        np.testing.assert_array_equal(items[k], items_w[k], err_msg=k)
    for k in out:
        np.testing.assert_array_equal(out[k], out_w[k], err_msg=k)
    np.testing.assert_array_equal(rewards, rewards_w)
    np.testing.assert_array_equal(keep, keep_w)
    assert items["mask"][:, :2].any()  # the context windows held real tokens


def test_std_scale_positive_and_chunk_steps_not_negative(hopper_checkpoint):
    with pytest.raises(grpo_dt.UserError, match="--std-scale must be > 0"):
        grpo_dt.setup(grpo_dt.Args(checkpoint=str(hopper_checkpoint), **TINY, std_scale=0.0))
    with pytest.raises(grpo_dt.UserError, match="--update-chunk-steps must be >= 0"):
        grpo_dt.setup(grpo_dt.Args(checkpoint=str(hopper_checkpoint), **TINY, update_chunk_steps=-1))
    with pytest.raises(grpo_dt.UserError, match="--pipeline-stages, --update-chunk-steps must be >= 0"):
        grpo_dt.setup(grpo_dt.Args(checkpoint=str(hopper_checkpoint), **TINY, pipeline_stages=-1))


def test_buffer_counts_draws_and_reports_evicted_items():
    buf = grpo_dt.SubtrajBuffer(4, "cpu")
    buf.add({"adv": np.zeros(4, np.float32)})
    rng = np.random.default_rng(0)
    for _ in range(5):
        buf.sample(2, rng)
    assert buf.draws.sum() == 10 and len(buf.retired_draws) == 0
    counts = buf.draws.copy()
    buf.add({"adv": np.ones(3, np.float32)})  # evicts slots 0-2, keeps slot 3
    np.testing.assert_array_equal(buf.retired_draws, counts[:3])
    np.testing.assert_array_equal(buf.draws, [0, 0, 0, counts[3]])


def test_relabel_replaces_rtg_tokens(hopper_setup):
    s = hopper_setup
    items, _, _, out = collect(s, relabel=True)
    hindsight = np.cumsum(out["reward"][:, ::-1], 1)[:, ::-1][:, :3] * s["scale"]
    np.testing.assert_allclose(items["rtg"][:, 2:, 0], hindsight, rtol=1e-5)
    assert not np.allclose(items["rtg"][:, 2:, 0], out["rtg"][:, :3])


# ---------------------------------------------------------------- pure pieces
def test_sequence_ratio_and_ablations():
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    valid = torch.ones(5, 4)
    valid[0, 2:] = 0
    diff = (logp - old) * valid
    torch.testing.assert_close(grpo_dt.sequence_ratio(logp, old, valid), diff.sum(-1).exp())
    torch.testing.assert_close(grpo_dt.sequence_ratio(logp, old, valid, "geometric"), (diff.sum(-1) / valid.sum(-1)).exp())
    torch.testing.assert_close(grpo_dt.sequence_ratio(logp, old, valid, "token"), diff.exp())
    assert (grpo_dt.sequence_ratio(old, old, valid) == 1).all()


def test_clipping_follows_eq3():
    eps = 0.2
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    loss, clipped = grpo_dt.grpo_loss(ratio, adv, None, eps)
    loss.backward()
    # A>0 above 1+eps and A<0 below 1-eps: clipped, no gradient; the pessimistic side keeps the raw ratio
    per = torch.tensor([1.2 * 1.0, 0.8 * -1.0, 0.5 * 1.0, 1.5 * -1.0, 1.1 * 2.0])
    torch.testing.assert_close(loss, -per.mean())
    torch.testing.assert_close(ratio.grad, -torch.tensor([0.0, 0.0, 1.0, -1.0, 2.0]) / 5)
    assert clipped.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    # diagnostics: the clip fraction split by sample age and advantage sign
    born = torch.tensor([3.0, 3.0, 2.0, 2.0, 3.0])
    split = grpo_dt.clip_breakdown(clipped, born, adv, iteration=3)
    assert split == pytest.approx(
        {"clipfrac_fresh": 2 / 3, "clipfrac_stale": 1.0, "clipfrac_adv_pos": 2 / 3, "clipfrac_adv_neg": 1.0}
    )


def test_group_advantages_and_delta_r_filter():
    r = np.random.default_rng(0).normal(size=(6, 8)) * 5 + 3
    adv, keep = grpo_dt.group_advantages(r, 0.0)
    np.testing.assert_allclose(adv.mean(1), 0, atol=1e-9)
    np.testing.assert_allclose(adv.std(1), 1, atol=1e-6)
    adv, keep = grpo_dt.group_advantages(np.array([[0.0, 1.0, 10.0, 11.0], [2.0, 2.0, 2.0, 2.0]]), 5.0)
    np.testing.assert_array_equal(keep, [[True, False, False, True], [False] * 4])
    np.testing.assert_allclose(adv[1], 0)
    np.testing.assert_allclose(grpo_dt.discounted_returns(np.ones((1, 4)), np.array([[1, 1, 1, 0]]), 0.5), [1.75])


def test_active_sampling_is_softmax_of_variances():
    v = np.array([0.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(grpo_dt.reset_probs(v), torch.softmax(torch.tensor(v), 0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(grpo_dt.reset_probs(v, uniform=True), 0.25)
    rng = np.random.default_rng(0)
    tr, h = grpo_dt.sample_reset_points([4], [v], rng, 1, 40_000, 3)
    assert (h == h[:, :1]).all() and (tr == 0).all()  # consistent: a group shares its reset point
    np.testing.assert_allclose(np.bincount(h[:, 0], minlength=4) / len(h), grpo_dt.reset_probs(v), atol=0.01)
    _, h = grpo_dt.sample_reset_points([4], [v], rng, 1, 1000, 3, consistent=False)
    assert (h != h[:, :1]).any()
    tr, _ = grpo_dt.sample_reset_points([1, 3], [np.zeros(1), np.zeros(3)], rng, 20_000, 1, 1)
    assert tr.mean() == pytest.approx(0.75, abs=0.015)  # trajectories in proportion to length


def test_presets_follow_table6():
    a = grpo_dt.Args(env_id="Hopper-v4", dataset="local/hopper/medium-v0", eval_len=7, narrow_exploration=False)
    assert grpo_dt.apply_presets(a, "mujoco", "hopper") == "medium"
    assert (a.g_online, a.subtraj_len, a.eval_len, a.gamma, a.clip_coef, a.kappa_initial, a.full_trajs_per_iter) == (
        7200,
        15,
        7,
        0.995,
        0.2,
        0.2,
        1,
    )
    d = grpo_dt.Args(env_id="AdroitHandDoor-v1", dataset="whatever")
    assert grpo_dt.apply_presets(d, "adroit", "door") == "human"
    assert (d.n_batch, d.delta_r, d.learning_rate, d.full_trajs_per_iter) == (512, 0.4, 3e-5, 5)
    u = grpo_dt.Args(env_id="AntMaze_UMaze-v4", dataset="umaze-diverse")
    grpo_dt.apply_presets(u, "antmaze", "antmaze")
    assert (u.c_online, u.gamma, u.g_online) == (5, 1.0, 2)


def test_narrow_exploration_scales_sigma_and_widens_the_clip_on_mujoco_and_adroit():
    """--narrow-exploration (default): on MuJoCo and Adroit sigma x 0.25 and 2x Table 6's epsilon;
    --no-narrow-exploration is the paper's (sigma x 1, Table 6's epsilon); AntMaze keeps the paper's either way;
    given values win."""

    def resolved(env_id, family, key, *flags):
        a = tyro.cli(grpo_dt.Args, args=["--env-id", env_id, *flags])
        grpo_dt.apply_presets(a, family, key)
        return a.std_scale, a.clip_coef

    assert resolved("Hopper-v4", "mujoco", "hopper") == (0.25, 0.4)
    assert resolved("Walker2d-v4", "mujoco", "walker2d") == (0.25, 0.6)
    assert resolved("Hopper-v4", "mujoco", "hopper", "--no-narrow-exploration") == (1.0, 0.2)
    assert resolved("Hopper-v4", "mujoco", "hopper", "--std-scale", "0.5", "--clip-coef", "0.3") == (0.5, 0.3)
    assert resolved("AdroitHandDoor-v1", "adroit", "door", "--dataset", "human") == (0.25, 0.6)
    assert resolved("AdroitHandDoor-v1", "adroit", "door", "--dataset", "human", "--no-narrow-exploration") == (1.0, 0.3)
    assert resolved("AntMaze_UMaze-v4", "antmaze", "antmaze", "--dataset", "umaze") == (1.0, 0.2)


def test_score_to_end_scores_members_to_the_end_of_their_episode(hopper_setup, hopper_checkpoint):
    """With --score-to-end L_eval reaches the time limit and gamma is 1, so a group reward is the member's undiscounted
    return to the end of its episode; by default Table 6's L_eval and gamma; explicit values win."""

    def resolved(**kw):
        args = grpo_dt.Args(checkpoint=str(hopper_checkpoint), **{**TINY, "eval_len": None, **kw})
        envs, _, _ = grpo_dt.setup(args)
        envs.close()
        return args.eval_len, args.gamma

    assert resolved(score_to_end=True) == (40, 1.0)
    assert resolved() == (400, 0.995)
    assert resolved(score_to_end=True, eval_len=7, gamma=0.9) == (7, 0.9)
    # The fixture's episodes fall at 11-12 steps: a time limit of 10 ends members first. Same reset points (rng) twice.
    s = {**hopper_setup, "envs": grpo_dt.EnvPool("Hopper-v4", 16, max_episode_steps=10)}
    _, rewards, _, out = collect({**s, "rng": np.random.default_rng(0)}, eval_len=10, gamma=1.0)
    ends = out["reset_step"] + out["valid"].sum(1)
    assert (ends <= 10).all() and (ends == 10).any()  # members stop at the time limit, not L_traj + L_eval after it
    np.testing.assert_allclose(rewards.ravel(), out["reward"].sum(1))
    _, short, _, _ = collect({**s, "rng": np.random.default_rng(0)}, eval_len=1, gamma=1.0)
    assert short.mean() < rewards.mean() - 1


# ---------------------------------------------------------------- end to end
def test_end_to_end_hopper_workers_resume_budget(hopper_checkpoint, tmp_path):
    ds = "local/hopper/medium-v0"
    save = tmp_path / "ft.pt"
    a = tiny_args("Hopper-v4", ds, hopper_checkpoint, tmp_path / "a", save_every=1, save_path=str(save), delta_r=0.0)
    score_a = grpo_dt.main(a)
    tags = scalars(tmp_path / "a" / "runs")
    for tag in ("charts/normalized_score", "charts/eval_return"):
        assert tags[tag] == [0, 1, 2]
    for tag in (
        "charts/episodic_return",
        "charts/env_steps",
        "charts/grad_updates",
        "charts/SPS",
        "losses/policy_loss",
        "losses/kl",
        "losses/entropy",
        "losses/clipfrac",
        "losses/kappa",
        "losses/ratio_mean",
        "losses/ratio_max",
        "losses/group_reward_std",
        "losses/dropped_fraction",
        "charts/episodic_length",
        "charts/reset_step_mean",
        "charts/reset_step_max",
        "charts/rollout_sigma",
        "charts/rollout_mu_abs",
        "charts/draws_per_subtraj",
        "losses/clipfrac_fresh",
        "losses/clipfrac_stale",
        "losses/clipfrac_adv_pos",
        "losses/clipfrac_adv_neg",
    ):
        assert tags[tag] == [1, 2], tag
    for tag in ("charts/normalized_score_se", "charts/eval_length", "charts/eval_reward_per_step"):
        assert tags[tag] == [0, 1, 2], tag
    ft = torch.load(save, weights_only=False)
    pre = torch.load(hopper_checkpoint, weights_only=False)
    assert ft["finetune"]["iteration"] == 2 and ft["finetune"]["grad_updates"] == 4
    assert any(not torch.equal(ft["state_dict"][k], pre["state_dict"][k]) for k in pre["state_dict"])
    check_checkpoint_loads(grpo_dt.load_model, save)
    # Worker processes give the same run as in-process stepping (seeded, exact)
    b = tiny_args(
        "Hopper-v4",
        ds,
        hopper_checkpoint,
        tmp_path / "b",
        num_workers=2,
        save_every=1,
        save_path=str(tmp_path / "b.pt"),
        delta_r=0.0,
    )
    assert grpo_dt.main(b) == score_a
    fb = torch.load(tmp_path / "b.pt", weights_only=False)
    assert fb["finetune"]["env_steps"] == ft["finetune"]["env_steps"]
    assert all(torch.equal(fb["state_dict"][k], ft["state_dict"][k]) for k in ft["state_dict"])
    # Resume continues the killed run; a step budget stops after the first iteration
    grpo_dt.main(
        tiny_args(
            "Hopper-v4",
            ds,
            hopper_checkpoint,
            tmp_path / "c",
            resume=str(save),
            num_iterations=3,
            save_every=1,
            save_path=str(save),
        )
    )
    assert torch.load(save, weights_only=False)["finetune"]["iteration"] == 3
    grpo_dt.main(tiny_args("Hopper-v4", ds, hopper_checkpoint, tmp_path / "d", num_iterations=5, total_env_steps=1))
    assert scalars(tmp_path / "d" / "runs")["charts/env_steps"] == [1]
    # --num-iterations 0 only evaluates the checkpoint
    grpo_dt.main(tiny_args("Hopper-v4", ds, hopper_checkpoint, tmp_path / "e", num_iterations=0))
    tags = scalars(tmp_path / "e" / "runs")
    assert tags["charts/normalized_score"] == [0] and "charts/env_steps" not in tags


def test_full_rollout_actions_flag_picks_sampled_or_mean_actions(hopper_checkpoint, tmp_path, monkeypatch):
    """--full-rollout-actions mean rolls the reset-point trajectories out with tanh(mean); the paper's are sampled."""
    calls = {}
    real = grpo_dt.run_episodes

    def spy(actor, envs, seeds, rtg, stochastic, record_sim=False):
        if record_sim:  # the full trajectories (evaluation does not record the simulator)
            calls.setdefault("stochastic", []).append(stochastic)
        return real(actor, envs, seeds, rtg, stochastic, record_sim=record_sim)

    monkeypatch.setattr(grpo_dt, "run_episodes", spy)
    for mode, expected in (("sampled", True), ("mean", False)):
        calls.clear()
        grpo_dt.main(
            tiny_args(
                "Hopper-v4",
                "local/hopper/medium-v0",
                hopper_checkpoint,
                tmp_path / mode,
                num_iterations=1,
                full_rollout_actions=mode,
            )
        )
        assert calls["stochastic"] == [expected]


def test_end_to_end_door(door_checkpoint, tmp_path):
    args = tiny_args(
        "AdroitHandDoor-v1",
        "local/door/human-v0",
        door_checkpoint,
        tmp_path,
        full_trajs_per_iter=2,
        n_batch=4,
        ratio="token",
        delta_r=0.0,
    )
    score = grpo_dt.main(args)
    assert np.isfinite(score)
    assert scalars(tmp_path / "runs")["losses/clipfrac"] == [1, 2]


def test_user_errors(door_checkpoint, tmp_path):
    with pytest.raises(grpo_dt.UserError, match="dims"):
        grpo_dt.main(tiny_args("Hopper-v4", "medium", door_checkpoint, tmp_path))
    with pytest.raises(grpo_dt.UserError, match="is not a file"):
        grpo_dt.main(tiny_args("Hopper-v4", "medium", door_checkpoint, tmp_path, resume=str(tmp_path / "nope.pt")))
    with pytest.raises(grpo_dt.UserError, match="not a run state"):
        grpo_dt.main(tiny_args("AdroitHandDoor-v1", "human", door_checkpoint, tmp_path, resume=str(door_checkpoint)))
    res = subprocess.run(
        [sys.executable, str(ROOT / "grpo_dt.py"), "--env-id", "Foo-v0"], capture_output=True, text=True, cwd=tmp_path
    )
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error: unknown --env-id 'Foo-v0'")


def test_missing_checkpoint_runs_pretraining(tmp_path):
    """A missing checkpoint starts pretrain_dt.py; its failure (a bad dataset here) is a one-line error."""
    args = tiny_args("Hopper-v4", "no-such-dataset", tmp_path / "missing.pt", tmp_path)
    with pytest.raises(grpo_dt.UserError, match="pretraining failed"):
        grpo_dt.main(args)


def test_iteration_zero_is_the_pretrained_score(hopper_checkpoint, tmp_path):
    """pretrain_dt.py scores at c_online, so its reported score is where finetuning starts."""
    ckpt = torch.load(hopper_checkpoint, weights_only=False)
    score = grpo_dt.main(
        tiny_args("Hopper-v4", "local/hopper/medium-v0", hopper_checkpoint, tmp_path, num_iterations=0, max_episode_steps=None)
    )
    assert score == pytest.approx(ckpt["eval_normalized_score"], abs=1e-6)


# ---------------------------------------------------------------- renamed flags, run state, non-finite guard
def test_renamed_flags_change_behaviour(hopper_setup, monkeypatch):
    """--clip-coef, --ratio, --no-consistent-reset and --reset-sampling each change what the algorithm computes."""
    s = hopper_setup
    G = s["args"].group_size
    _, _, _, out = collect(s, consistent_reset=True)
    assert (out["reset_step"].reshape(-1, G) == out["reset_step"].reshape(-1, G)[:, :1]).all()
    _, _, _, out = collect(s, consistent_reset=False)
    assert (out["reset_step"].reshape(-1, G) != out["reset_step"].reshape(-1, G)[:, :1]).any()
    seen, real = [], grpo_dt.sample_reset_points

    def spy(*a, **kw):
        seen.append(kw["uniform"])
        return real(*a, **kw)

    monkeypatch.setattr(grpo_dt, "sample_reset_points", spy)
    collect(s, reset_sampling="uniform")
    collect(s, reset_sampling="variance")
    assert seen == [True, False]  # reset_probs(uniform=...) is tested in test_active_sampling_is_softmax_of_variances
    items, *_ = collect(s, eval_len=2)
    buf = grpo_dt.SubtrajBuffer(64, "cpu")
    buf.add(items)
    batch = buf.sample(16, s["rng"])
    moved = copy.deepcopy(s["model"])
    with torch.no_grad():
        moved.mean_head.bias.add_(0.05)
    stats = {
        (c, r): grpo_dt.grpo_backward(moved, s["model"], batch, with_(s["args"], clip_coef=c, ratio=r), 0.1)[1]
        for c in (1e-4, 1e6)  # 1e6: no ratio of a shifted mean over L_traj steps reaches it
        for r in ("sequence", "token", "geometric")
    }
    assert stats[(1e-4, "sequence")]["clipfrac"] > stats[(1e6, "sequence")]["clipfrac"] == 0
    assert len({round(stats[(1e-4, r)]["ratio_mean"], 6) for r in ("sequence", "token", "geometric")}) == 3


def test_save_model_writes_a_loadable_checkpoint(hopper_checkpoint, tmp_path):
    grpo_dt.main(
        tiny_args("Hopper-v4", "local/hopper/medium-v0", hopper_checkpoint, tmp_path, num_iterations=1, save_model=True)
    )
    (run,) = list((tmp_path / "runs").iterdir())
    assert (run / "state.pt").exists()  # the run state is saved by default
    ckpt = check_checkpoint_loads(grpo_dt.load_model, run / "grpo_dt.pt")
    assert "finetune" not in ckpt and ckpt["finetune_args"]["save_model"]


def test_keep_states_keeps_every_saved_state(hopper_checkpoint, tmp_path):
    args = tiny_args("Hopper-v4", "local/hopper/medium-v0", hopper_checkpoint, tmp_path, num_iterations=3, save_every=1)
    grpo_dt.main(args)
    (run,) = list((tmp_path / "runs").iterdir())
    assert sorted(p.name for p in run.glob("state*.pt")) == ["state.pt"]  # off by default: only the latest state
    grpo_dt.main(with_(args, keep_states=True, runs_dir=str(tmp_path / "kept")))
    (run,) = list((tmp_path / "kept").iterdir())
    kept = sorted(p.name for p in run.glob("state_it*.pt"))
    assert kept == ["state_it0001.pt", "state_it0002.pt", "state_it0003.pt"]
    iterations = [torch.load(run / name, weights_only=False)["finetune"]["iteration"] for name in kept]
    assert iterations == [1, 2, 3]


def same(a, b) -> bool:
    """Bit-exact equality of nested run states (tensors, arrays, dicts, lists)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    return a == b or (a != a and b != b)


def test_killed_run_resumes_bit_exactly(hopper_checkpoint, tmp_path):
    """SIGKILL a run once its state shows iteration >= 2, --resume it, compare with an uninterrupted run."""
    flags = {**TINY, "delta_r": 0.0}
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    cmd = [
        sys.executable,
        str(ROOT / "grpo_dt.py"),
        "--env-id",
        "Hopper-v4",
        "--dataset",
        "local/hopper/medium-v0",
        "--checkpoint",
        str(hopper_checkpoint),
        "--save-every",
        "1",
        *cli,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        cmd + ["--num-iterations", "200", "--runs-dir", str(tmp_path / "k")], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    saved, deadline = 0, time.time() + 120
    while saved < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        states = list((tmp_path / "k").glob("*/state.pt"))
        if states:
            saved = torch.load(states[0], weights_only=False)["finetune"]["iteration"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved >= 2, (tmp_path / "killed.log").read_text()[-2000:]
    (state,) = list((tmp_path / "k").glob("*/state.pt"))
    saved = torch.load(state, weights_only=False)["finetune"]["iteration"]
    assert f"run state (for --resume): {state}" in (tmp_path / "killed.log").read_text()
    end = saved + 2
    res = subprocess.run(
        cmd + ["--num-iterations", str(end), "--runs-dir", str(tmp_path / "k"), "--resume", str(state)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [x for x in res.stdout.splitlines() if x.startswith("iteration ")]
    assert lines[0].startswith(f"iteration {saved}: eval return") and lines[1].startswith(f"iteration {saved + 1}: score")
    resumed = torch.load(state, weights_only=False)  # the resumed run kept its name, so it wrote the same file
    uninterrupted = tiny_args(
        "Hopper-v4",
        "local/hopper/medium-v0",
        hopper_checkpoint,
        tmp_path / "u",
        num_iterations=end,
        save_every=1,
        **{**TINY, **flags},
    )
    grpo_dt.main(uninterrupted)
    (ref_state,) = list((tmp_path / "u" / "runs").glob("*/state.pt"))
    reference = torch.load(ref_state, weights_only=False)
    assert resumed["finetune"]["iteration"] == reference["finetune"]["iteration"] == end
    for key in ("state_dict", "eval_normalized_score"):
        assert same(resumed[key], reference[key]), key
    for key in reference["finetune"]:
        if key not in ("run_name", "args"):
            assert same(resumed["finetune"][key], reference["finetune"][key]), key
    settings = [{k: v for k, v in s["finetune"]["args"].items() if k not in grpo_dt.RUN_CONTROL} for s in (resumed, reference)]
    assert settings[0] == settings[1]  # the resumed run kept the run's settings; only run-control flags differ


def test_non_finite_stops_with_one_line_and_keeps_the_state(hopper_checkpoint, tmp_path, monkeypatch):
    state = tmp_path / "state.pt"
    args = tiny_args(
        "Hopper-v4",
        "local/hopper/medium-v0",
        hopper_checkpoint,
        tmp_path,
        num_iterations=1,
        save_every=1,
        save_path=str(state),
        delta_r=0.0,
    )
    grpo_dt.main(args)
    good = state.read_bytes()
    real = grpo_dt.grpo_objective

    def nan_loss(*a, **kw):
        loss, terms = real(*a, **kw)
        return loss * float("nan"), terms

    monkeypatch.setattr(grpo_dt, "grpo_objective", nan_loss)
    with pytest.raises(grpo_dt.UserError) as e:
        grpo_dt.main(with_(args, resume=str(state), num_iterations=3))
    assert str(e.value) == f"non-finite loss at iteration 2; stopped, last good state kept at {state}"
    assert state.read_bytes() == good
    monkeypatch.setattr(grpo_dt, "grpo_objective", real)
    bad = torch.load(state, weights_only=False)  # a NaN weight: the first rollout's actions are NaN
    bad["state_dict"]["mean_head.bias"][0] = float("nan")
    torch.save(bad, tmp_path / "bad.pt")
    before = (tmp_path / "bad.pt").read_bytes()
    with pytest.raises(grpo_dt.UserError, match=r"^non-finite action at iteration 1; stopped, last good state kept at"):
        grpo_dt.main(with_(args, resume=str(tmp_path / "bad.pt"), save_path=str(tmp_path / "bad.pt"), num_iterations=3))
    assert (tmp_path / "bad.pt").read_bytes() == before
