"""Tests of grpo_dt.py: exact resets, group consistency, Eq. 2/3 pieces, active sampling, presets, end to end,
kill/resume, one-line errors."""

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

HOPPER = dict(env_id="Hopper-v4", dataset="local/hopper/medium-v0")
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


def tiny_args(checkpoint, tmp_path, **kw):
    base = dict(HOPPER, checkpoint=str(checkpoint), runs_dir=str(tmp_path / "runs"), num_iterations=2, **TINY)
    return grpo_dt.Args(**{**base, **kw})


def with_(args, **kw):
    return dataclasses.replace(args, **kw)


def scalars(runs_dir, values=False):
    """{tag: [steps]} (or [values]) of the one run under `runs_dir`, as TensorBoard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = list(Path(runs_dir).iterdir())
    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [e.value if values else e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def episodes(policy, envs, seeds, rtg, c, max_steps=40, sampled=True):
    """Full episodes from fresh resets (as main's line 2), recorded for resets, and their buffer trajectories."""
    obs, params = envs.reset(range(len(seeds)), seeds)
    steps = (max_steps, 0) if sampled else (0, max_steps)
    out = grpo_dt.rollout(policy, envs, grpo_dt.start_windows(policy, obs, rtg, c), *steps, record_sim=True)
    return out, [{k: v[m, : out["valid"][m].sum()] for k, v in out.items()} | {"params": p} for m, p in enumerate(params)]


# ---------------------------------------------------------------- exact resets
@pytest.mark.parametrize("env_id", ["Hopper-v4", "AdroitHandDoor-v1", "AntMaze_UMaze-v4"])
@pytest.mark.parametrize("at_start", [False, True])
def test_reset_replay_is_exact(env_id, at_start):
    """Record a state in member 0, step fixed actions, restore the state into member 1 (another episode), replay."""
    n, warmup = 25, 6
    envs = grpo_dt.Envs(grpo_dt.Args(env_id=env_id, max_episode_steps=warmup + 1 + n), 2)  # replay ends at the limit
    rng = np.random.default_rng(0)
    A = envs.envs[0].action_space.shape[0]
    _, (params, other) = envs.reset([0, 1], [3, 4])
    if envs.family != "mujoco":  # the other member really is in a different episode: params must be restored
        assert any(not np.allclose(params[k], other[k]) for k in other if k not in ("qpos", "qvel"))
    prev = None
    if not at_start:
        for _ in range(warmup):
            envs.step([0], rng.uniform(-1, 1, (1, A)))
        prev = envs.get_states([0])[0][0]
        envs.step([0], rng.uniform(-1, 1, (1, A)))
    state, elapsed = envs.get_states([0])
    actions = rng.uniform(-1, 1, (n, 1, A))
    first = [envs.step([0], a) for a in actions]
    envs.restore([1], [(params, prev, state[0], elapsed[0])])
    restored, restored_elapsed = envs.get_states([1])
    np.testing.assert_array_equal(restored, state)
    assert restored_elapsed[0] == elapsed[0] == (0 if at_start else warmup + 1)
    second = [envs.step([1], a) for a in actions]
    for (o1, r1, te1, tr1), (o2, r2, te2, tr2) in zip(first, second):
        assert np.abs(o1 - o2).max() <= 1e-9 and np.abs(r1 - r2).max() <= 1e-9
        assert te1 == te2 and tr1 == tr2
    if not at_start and not first[-1][2][0]:
        assert first[-1][3][0] and second[-1][3][0]  # the TimeLimit counter came back with the state


# ---------------------------------------------------------------- rollouts and groups on a real checkpoint
def make_hopper_setup(checkpoint) -> dict:
    """A policy, envs and two recorded full trajectories, with c_online 3 (real context windows) and every member kept."""
    model, ckpt = grpo_dt.load_model(checkpoint)
    args = grpo_dt.Args(**HOPPER, c_online=3, delta_r=-1.0, gamma=0.99, **{**TINY, "group_size": 4, "eval_len": 4})
    grpo_dt.apply_presets(args, 3, 40)
    envs = grpo_dt.Envs(args, 16)
    scale = ckpt["rtg_scale"]
    policy = grpo_dt.Policy(model.eval(), ckpt["state_mean"], ckpt["state_std"], scale, 1.0, torch.Generator().manual_seed(0))
    _, trajs = episodes(policy, envs, [1, 2], args.g_online, c=3)
    rng = np.random.default_rng(0)
    return dict(model=model, policy=policy, ckpt=ckpt, args=args, envs=envs, scale=scale, rng=rng, trajs=trajs)


@pytest.fixture(scope="module")
def hopper_setup(hopper_checkpoint):
    return make_hopper_setup(hopper_checkpoint)


def collect(s, **kw):
    """collect_groups on the fixture's trajectories, with Args fields overridden."""
    return grpo_dt.collect_groups(s["policy"], s["envs"], s["trajs"], with_(s["args"], **kw), s["rng"])


def test_checkpoint_loads_with_dropout_off(hopper_checkpoint):
    model, ckpt = grpo_dt.load_model(hopper_checkpoint)
    assert all(b.dropout == 0 for b in model.blocks)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    check_checkpoint_loads(grpo_dt.load_model, hopper_checkpoint)


@pytest.mark.parametrize("c", [1, 3])
def test_a_members_action_does_not_depend_on_its_batch(hopper_setup, c):
    """Rollouts pad CPU batches to 16 rows: a member's mean and sigma are bit for bit the same whether it is acted for
    alone, with a few others or in a large batch (members finish one by one, so rollout batches shrink)."""
    policy, g = hopper_setup["policy"], torch.Generator().manual_seed(c)
    win = [torch.randn(80, c, 1, generator=g), torch.randn(80, c, 11, generator=g), torch.randn(80, c, 3, generator=g)]
    win.append(torch.rand(80, c, generator=g) > 0.3)
    win[2][:, -1], win[3][:, -1] = 0.0, True
    with torch.inference_mode():
        whole = policy(win)
        for B in (1, 2, 5, 15, 16, 17, 40):
            for a, b in zip(policy([x[:B] for x in win]), whole):
                assert torch.equal(a, b[:B]), B


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
    np.testing.assert_array_equal(items["rtg"][:, c - 1 :, 0], out["rtg"][:, :3])
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
    s["envs"].restore([4, 5, 6], [(t["params"], t["sim"][h - 1], t["sim"][h], t["elapsed"][h])] * 3)
    for j in range(n):
        obs, rew, _, _ = s["envs"].step([4, 5, 6], np.repeat(t["actions"][h + j][None], 3, 0))
        np.testing.assert_allclose(rew, t["reward"][h + j], atol=1e-9, rtol=0)
        np.testing.assert_allclose(s["policy"].norm(obs).numpy(), np.repeat(t["states"][h + j + 1][None], 3, 0), atol=1e-5)


def test_group_members_stop_at_the_time_limit(hopper_setup):
    """The TimeLimit counter comes back with a reset point: with a limit of 10, members stop at step 10 of their
    episode, not L_traj + L_eval steps after the reset point, and a longer L_eval adds their later rewards."""
    s = {**hopper_setup, "envs": grpo_dt.Envs(with_(hopper_setup["args"], max_episode_steps=10), 16)}
    _, rewards, _, out = collect({**s, "rng": np.random.default_rng(0)}, eval_len=10, gamma=1.0)
    ends = out["reset_step"] + out["valid"].sum(1)
    assert (ends <= 10).all() and (ends == 10).any()
    np.testing.assert_allclose(rewards.ravel(), out["reward"].sum(1))
    _, short, _, _ = collect({**s, "rng": np.random.default_rng(0)}, eval_len=1, gamma=1.0)
    assert short.mean() < rewards.mean() - 1
    _, discounted, _, out = collect({**s, "rng": np.random.default_rng(0)}, eval_len=10, gamma=0.5)  # Eq. 2's rewards
    expected = [sum(0.5**t * r for t, r in enumerate(row[v])) for row, v in zip(out["reward"], out["valid"])]
    np.testing.assert_allclose(discounted.ravel(), expected)


@pytest.mark.parametrize("std_scale", [1.0, 0.5])
def test_sequence_ratio_is_one_before_update_and_kl_zero(hopper_setup, std_scale):
    s = {**hopper_setup, "policy": dataclasses.replace(hopper_setup["policy"], std_scale=std_scale)}
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
        grpo_dt.grpo_backward(model, copy.deepcopy(model), batch, with_(s["args"], clip_coef=0.2, kl_coef=0.0), 0.0)
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
    """--std-scale s: a sampled step draws u = mean + s sigma eps, and its recorded variance and log-prob are those of
    N(mean, (s sigma)^2) squashed; the same noise eps at every scale."""
    s, obs = hopper_setup, np.zeros((4, 11))
    win = grpo_dt.start_windows(s["policy"], obs, 100.0, 1)
    with torch.no_grad():
        mean, log_std = s["model"](*win)
        mean, log_std = mean[:, -1], log_std[:, -1]
    eps = {}
    for scale in (1.0, 0.25):
        s["envs"].reset(np.arange(4), [5, 6, 7, 8])
        policy = dataclasses.replace(s["policy"], std_scale=scale, gen=torch.Generator().manual_seed(3))
        out = grpo_dt.rollout(policy, s["envs"], win, 1, 0)
        u, sigma = torch.as_tensor(out["u"][:, 0]), scale * log_std.exp()
        np.testing.assert_allclose(out["var"][:, 0], (sigma**2).mean(-1).numpy(), rtol=1e-5)
        expected = grpo_dt.squashed_logprob(mean, log_std + np.log(scale), u)
        np.testing.assert_allclose(out["logp"][:, 0], expected.numpy(), rtol=1e-4, atol=1e-4)
        eps[scale] = ((u - mean) / sigma).numpy()
    np.testing.assert_allclose(eps[0.25], eps[1.0], atol=1e-4)


def test_subtraj_buffer_is_fifo():
    buf = grpo_dt.SubtrajBuffer(4, "cpu")
    buf.add({"adv": np.arange(3, dtype=np.float32)})
    buf.add({"adv": np.arange(3, 6, dtype=np.float32)})  # evicts the oldest two
    assert buf.size == 4 and sorted(buf.data["adv"].tolist()) == [2, 3, 4, 5]
    assert set(buf.sample(50, np.random.default_rng(0))["adv"].tolist()) == {2, 3, 4, 5}  # uniform over what it holds


def test_relabel_replaces_rtg_tokens(hopper_setup):
    s = hopper_setup
    items, _, _, out = collect(s, relabel=True)
    hindsight = np.cumsum(out["reward"][:, ::-1], 1)[:, ::-1][:, :3] * s["scale"]
    np.testing.assert_allclose(items["rtg"][:, 2:, 0], hindsight, rtol=1e-5)
    assert not np.allclose(items["rtg"][:, 2:, 0], out["rtg"][:, :3])


def test_ablation_flags_change_behaviour(hopper_setup):
    """--clip-coef, --ratio and --no-consistent-reset each change what the algorithm computes (--reset-sampling:
    test_active_sampling_is_softmax_of_variances)."""
    s = hopper_setup
    G = s["args"].group_size
    _, _, _, out = collect(s, consistent_reset=True)
    assert (out["reset_step"].reshape(-1, G) == out["reset_step"].reshape(-1, G)[:, :1]).all()
    _, _, _, out = collect(s, consistent_reset=False)
    assert (out["reset_step"].reshape(-1, G) != out["reset_step"].reshape(-1, G)[:, :1]).any()
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


def test_group_advantages_and_delta_r_filter():
    r = np.random.default_rng(0).normal(size=(6, 8)) * 5 + 3
    adv, keep = grpo_dt.group_advantages(r, 0.0)
    np.testing.assert_allclose(adv.mean(1), 0, atol=1e-9)
    np.testing.assert_allclose(adv.std(1), 1, atol=1e-6)
    adv, keep = grpo_dt.group_advantages(np.array([[0.0, 1.0, 10.0, 11.0], [2.0, 2.0, 2.0, 2.0]]), 5.0)
    np.testing.assert_array_equal(keep, [[True, False, False, True], [False] * 4])
    np.testing.assert_allclose(adv[1], 0)


def test_active_sampling_is_softmax_of_variances():
    """Alg. 1 lines 3, 5: trajectories in proportion to length, reset points by softmax of the action variance (uniform
    with --reset-sampling uniform), shared by a group unless --no-consistent-reset; --full-trajectory starts at 0."""
    v, rng = np.array([0.0, 1.0, 2.0, 3.0]), np.random.default_rng(0)

    def points(buffer=({"reward": np.zeros(4), "var": v},), **kw):
        return grpo_dt.sample_reset_points(buffer, grpo_dt.Args(**{"trajs_per_iter": 1, "group_size": 3, **kw}), rng)

    tr, h = points(reset_points=40_000)
    assert (h == h[:, :1]).all() and (tr == 0).all()  # consistent: a group shares its reset point
    softmax = torch.softmax(torch.tensor(v), 0).numpy()
    np.testing.assert_allclose(np.bincount(h[:, 0], minlength=4) / len(h), softmax, atol=0.01)
    _, h = points(reset_points=40_000, reset_sampling="uniform")
    np.testing.assert_allclose(np.bincount(h[:, 0], minlength=4) / len(h), 0.25, atol=0.01)
    _, h = points(reset_points=1000, consistent_reset=False)
    assert (h != h[:, :1]).any()
    _, h = points(reset_points=10, full_trajectory=True)
    assert (h == 0).all()
    buffer = [{"reward": np.zeros(n), "var": np.zeros(n)} for n in (1, 3)]
    tr, _ = points(buffer, trajs_per_iter=5000, reset_points=1, group_size=1)
    assert tr.mean() == pytest.approx(0.75, abs=0.02)  # trajectories in proportion to length


def test_presets_follow_table6():
    a = grpo_dt.Args(**HOPPER, eval_len=7)
    grpo_dt.apply_presets(a, 3, 1000)
    assert (a.g_online, a.subtraj_len, a.eval_len, a.gamma, a.clip_coef, a.kappa_initial, a.full_trajs_per_iter) == (
        7200,
        15,
        7,
        0.995,
        0.2,
        0.2,
        1,
    )
    assert (a.target_entropy, a.eval_context_len) == (-3.0, 1)
    d = grpo_dt.Args(env_id="AdroitHandDoor-v1", dataset="whatever")
    grpo_dt.apply_presets(d, 28, 200)  # a dataset without a row: the family's default row (Door-H)
    assert (d.n_batch, d.delta_r, d.learning_rate, d.full_trajs_per_iter) == (512, 0.4, 3e-5, 5)
    for dataset, kappa in (("random", 0.2), ("mujoco/walker2d/medium-replay-v0", 0.04)):  # medium-replay: the M row
        w = grpo_dt.Args(env_id="Walker2d-v4", dataset=dataset)
        grpo_dt.apply_presets(w, 6, 1000)
        assert (w.g_online, w.kappa_initial) == (10000, kappa)
    u = grpo_dt.Args(env_id="AntMaze_UMaze-v4", dataset="umaze-diverse")
    grpo_dt.apply_presets(u, 8, 700)
    assert (u.c_online, u.gamma, u.g_online) == (5, 1.0, 2)
    f = grpo_dt.Args(**HOPPER, full_trajectory=True)  # Fig. 2a: whole undiscounted episodes from the start
    grpo_dt.apply_presets(f, 3, 1000)
    assert (f.subtraj_len, f.eval_len, f.gamma, f.reset_points) == (1000, 0, 1.0, 1)


def test_defaults_are_the_papers_and_scale_cpu_narrows_exploration():
    """The default is Table 5/6 exactly (sigma x 1, the table's eps); --scale cpu switches --narrow-exploration on
    (sigma x 0.25, 2x eps on MuJoCo and Adroit, AntMaze keeps the paper's); explicit flags win."""

    def resolved(env_id, *flags):
        a = tyro.cli(grpo_dt.Args, args=["--env-id", env_id, *flags])
        grpo_dt.apply_presets(a, 3, 1000)
        return a.std_scale, a.clip_coef, a.narrow_exploration

    assert resolved("Hopper-v4") == (1.0, 0.2, False)
    assert resolved("Hopper-v4", "--scale", "cpu") == (0.25, 0.4, True)
    assert resolved("Walker2d-v4", "--scale", "cpu") == (0.25, 0.6, True)
    assert resolved("Hopper-v4", "--scale", "cpu", "--no-narrow-exploration") == (1.0, 0.2, False)
    assert resolved("Hopper-v4", "--narrow-exploration") == (0.25, 0.4, True)
    assert resolved("Hopper-v4", "--scale", "cpu", "--std-scale", "0.5", "--clip-coef", "0.3") == (0.5, 0.3, True)
    assert resolved("AdroitHandDoor-v1", "--dataset", "human", "--scale", "cpu")[:2] == (0.25, 0.6)
    assert resolved("AntMaze_UMaze-v4", "--dataset", "umaze", "--scale", "cpu")[:2] == (1.0, 0.2)


# ---------------------------------------------------------------- end to end
def test_end_to_end_hopper_resume_budget(hopper_checkpoint, tmp_path):
    save = tmp_path / "ft.pt"
    grpo_dt.main(tiny_args(hopper_checkpoint, tmp_path / "a", save_every=1, save_path=str(save), delta_r=0.0))
    tags = scalars(tmp_path / "a" / "runs")
    for tag in ("charts/normalized_score", "charts/normalized_score_se", "charts/eval_return", "charts/eval_length"):
        assert tags[tag] == [0, 1, 2], tag
    train = "episodic_return episodic_length env_steps grad_updates SPS reset_step_mean reset_step_max learning_rate".split()
    losses = "policy_loss kl entropy clipfrac kappa ratio_mean ratio_max group_reward_std dropped_fraction".split()
    assert {t for t in tags if tags[t] == [1, 2]} == {f"charts/{k}" for k in train} | {f"losses/{k}" for k in losses}
    ft = torch.load(save, weights_only=False)
    pre = torch.load(hopper_checkpoint, weights_only=False)
    assert ft["finetune"]["iteration"] == 2 and ft["finetune"]["grad_updates"] == 4
    assert any(not torch.equal(ft["state_dict"][k], pre["state_dict"][k]) for k in pre["state_dict"])
    check_checkpoint_loads(grpo_dt.load_model, save)
    # Resume continues the run; a step budget stops after the first iteration
    grpo_dt.main(grpo_dt.Args(resume=str(save), num_iterations=3))
    assert torch.load(save, weights_only=False)["finetune"]["iteration"] == 3
    grpo_dt.main(tiny_args(hopper_checkpoint, tmp_path / "d", num_iterations=5, total_env_steps=1))
    assert scalars(tmp_path / "d" / "runs")["charts/env_steps"] == [1]
    # --num-iterations 0 only evaluates the checkpoint
    grpo_dt.main(tiny_args(hopper_checkpoint, tmp_path / "e", num_iterations=0))
    tags = scalars(tmp_path / "e" / "runs")
    assert tags["charts/normalized_score"] == [0] and "charts/env_steps" not in tags


def test_end_to_end_door(door_checkpoint, tmp_path):
    args = tiny_args(door_checkpoint, tmp_path, env_id="AdroitHandDoor-v1", dataset="local/door/human-v0")
    score = grpo_dt.main(with_(args, full_trajs_per_iter=2, n_batch=4, ratio="token", delta_r=0.0))
    assert np.isfinite(score)
    assert scalars(tmp_path / "runs")["losses/clipfrac"] == [1, 2]


def test_iteration_zero_is_the_pretrained_score(hopper_checkpoint, tmp_path):
    """pretrain_dt.py scores at c_online, so its reported score is where finetuning starts."""
    ckpt = torch.load(hopper_checkpoint, weights_only=False)
    score = grpo_dt.main(tiny_args(hopper_checkpoint, tmp_path, num_iterations=0, max_episode_steps=None))
    assert score == pytest.approx(ckpt["eval_normalized_score"], abs=1e-6)


def test_save_model_writes_a_loadable_checkpoint(hopper_checkpoint, tmp_path):
    grpo_dt.main(tiny_args(hopper_checkpoint, tmp_path, num_iterations=1, save_model=True))
    (run,) = list((tmp_path / "runs").iterdir())
    assert (run / "state.pt").exists()  # the run state is saved by default
    ckpt = check_checkpoint_loads(grpo_dt.load_model, run / "grpo_dt.pt")
    assert "finetune" not in ckpt and ckpt["finetune_args"]["save_model"]


# ---------------------------------------------------------------- user errors
@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("learning_rate", -1.0, "--learning-rate must be > 0, got -1.0"),
        ("eval_episodes", 0, "--eval-episodes must be > 0, got 0"),
        ("num_iterations", -1, "--num-iterations must be >= 0, got -1"),
        ("group_size", 0, "--group-size must be > 0, got 0"),
        ("gamma", 1.5, "--gamma must be in [0, 1], got 1.5"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_nothing_runs(hopper_checkpoint, tmp_path, flag, value, message):
    with pytest.raises(grpo_dt.UserError) as e:
        grpo_dt.main(tiny_args(hopper_checkpoint, tmp_path, **{flag: value}))
    assert str(e.value) == message and not (tmp_path / "runs").exists()


def test_user_errors(hopper_checkpoint, door_checkpoint, tmp_path, monkeypatch):
    with pytest.raises(grpo_dt.UserError, match="dims"):
        grpo_dt.main(tiny_args(door_checkpoint, tmp_path))
    with pytest.raises(grpo_dt.UserError, match="does not exist"):
        grpo_dt.main(tiny_args(door_checkpoint, tmp_path, resume=str(tmp_path / "nope.pt")))
    with pytest.raises(grpo_dt.UserError, match="not a run state"):
        grpo_dt.main(grpo_dt.Args(resume=str(door_checkpoint)))
    # an explicit --checkpoint that is missing is an error, not a reason to pretrain
    monkeypatch.setattr(grpo_dt.subprocess, "run", lambda *a, **kw: pytest.fail("pretraining started"))
    with pytest.raises(grpo_dt.UserError, match=r"^--checkpoint '.*missing.pt' does not exist$"):
        grpo_dt.main(tiny_args(tmp_path / "missing.pt", tmp_path))
    monkeypatch.undo()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    for bad in ("notes.txt", "empty.pt"):
        with pytest.raises(grpo_dt.UserError, match=rf"^--checkpoint '.*{bad}' cannot be read by torch.load \(\w+\)$"):
            grpo_dt.main(tiny_args(tmp_path / bad, tmp_path))
    with pytest.raises(grpo_dt.UserError, match="unknown --env-id 'Foo-v0'"):
        grpo_dt.main(tiny_args(hopper_checkpoint, tmp_path, env_id="Foo-v0"))
    # on the command line, an error is one line on stderr and exit status 1
    res = subprocess.run(
        [sys.executable, str(ROOT / "grpo_dt.py"), "--group-size", "0"], capture_output=True, text=True, cwd=tmp_path
    )
    assert res.returncode == 1 and res.stderr.splitlines() == ["error: --group-size must be > 0, got 0"], res.stderr


def test_missing_default_checkpoint_runs_pretraining(tmp_path, monkeypatch):
    """With no --checkpoint, a missing default checkpoint starts pretrain_dt.py with --pretrain-extra-args; its failure
    (an unknown flag here) is a one-line error."""
    monkeypatch.chdir(tmp_path)
    args = grpo_dt.Args(**HOPPER, **TINY, runs_dir=str(tmp_path / "runs"), pretrain_extra_args="--no-such-flag")
    with pytest.raises(grpo_dt.UserError, match=r"^pretraining failed, no checkpoint at checkpoints/Hopper-v4__local-hopper"):
        grpo_dt.main(args)


# ---------------------------------------------------------------- run state, resume, non-finite guard
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
    cmd = [sys.executable, str(ROOT / "grpo_dt.py"), "--env-id", "Hopper-v4", "--dataset", "local/hopper/medium-v0"]
    cmd += ["--checkpoint", str(hopper_checkpoint), "--save-every", "1", "--runs-dir", str(tmp_path / "k"), *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd + ["--num-iterations", "200"], stdout=log, stderr=subprocess.STDOUT, env=env)
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
    grpo_dt.main(grpo_dt.Args(resume=str(state), num_iterations=end))
    resumed = torch.load(state, weights_only=False)  # the resumed run kept its name, so it wrote the same file
    grpo_dt.main(tiny_args(hopper_checkpoint, tmp_path / "u", num_iterations=end, save_every=1, **flags))
    (ref_state,) = list((tmp_path / "u" / "runs").glob("*/state.pt"))
    reference = torch.load(ref_state, weights_only=False)
    assert resumed["finetune"]["iteration"] == reference["finetune"]["iteration"] == end
    for key in ("state_dict", "eval_normalized_score"):
        assert same(resumed[key], reference[key]), key
    for key in reference["finetune"].keys() - {"run_name"}:
        assert same(resumed["finetune"][key], reference["finetune"][key]), key
    run_settings = [{k: v for k, v in s["args"].items() if k not in ("runs_dir", "resume")} for s in (resumed, reference)]
    assert run_settings[0] == run_settings[1]  # the resumed run kept the run's settings; only its budget changed


def test_resume_keeps_the_runs_budget_and_logs_each_iteration_once(hopper_checkpoint, tmp_path, monkeypatch):
    """A run of 3 iterations dies while saving iteration 2 (its state: iteration 1; iteration 2 already logged);
    --resume with no budget flag runs to the run's own 3, and TensorBoard shows every iteration once."""
    args = tiny_args(hopper_checkpoint, tmp_path, num_iterations=3, save_every=1, delta_r=0.0)
    calls, real = [], grpo_dt.save

    def die_at_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(grpo_dt, "save", die_at_second)
    with pytest.raises(KeyboardInterrupt):
        grpo_dt.main(args)
    monkeypatch.undo()
    (state,) = list((tmp_path / "runs").glob("*/state.pt"))
    assert torch.load(state, weights_only=False)["finetune"]["iteration"] == 1
    assert scalars(tmp_path / "runs")["charts/env_steps"] == [1, 2]
    assert grpo_dt.main(grpo_dt.Args(resume=str(state))) == torch.load(state, weights_only=False)["eval_normalized_score"]
    assert torch.load(state, weights_only=False)["finetune"]["iteration"] == 3
    tags = scalars(tmp_path / "runs")
    assert tags["charts/normalized_score"] == [0, 1, 2, 3] and tags["charts/env_steps"] == [1, 2, 3]
    assert all(steps == sorted(set(steps)) for steps in tags.values()), tags


def test_non_finite_stops_with_one_line_and_keeps_the_state(hopper_checkpoint, tmp_path, monkeypatch):
    state = tmp_path / "state.pt"
    args = tiny_args(hopper_checkpoint, tmp_path, num_iterations=1, save_every=1, save_path=str(state), delta_r=0.0)
    grpo_dt.main(args)
    good = state.read_bytes()
    real = grpo_dt.grpo_objective

    def nan_loss(*a, **kw):
        pg_loss, *rest = real(*a, **kw)
        return pg_loss * float("nan"), *rest

    monkeypatch.setattr(grpo_dt, "grpo_objective", nan_loss)
    with pytest.raises(grpo_dt.UserError) as e:
        grpo_dt.main(grpo_dt.Args(resume=str(state), num_iterations=3))
    assert str(e.value) == f"non-finite loss at iteration 2; stopped, last good state kept at {state}"
    assert state.read_bytes() == good
    monkeypatch.setattr(grpo_dt, "grpo_objective", real)
    bad = torch.load(state, weights_only=False)  # a NaN weight: the first rollout's actions are NaN
    bad["state_dict"]["mean_head.bias"][0] = float("nan")
    bad["args"]["save_path"] = str(tmp_path / "bad.pt")
    torch.save(bad, tmp_path / "bad.pt")
    before = (tmp_path / "bad.pt").read_bytes()
    with pytest.raises(grpo_dt.UserError, match=r"^non-finite action at iteration 2; stopped, last good state kept at"):
        grpo_dt.main(grpo_dt.Args(resume=str(tmp_path / "bad.pt"), num_iterations=3))
    assert (tmp_path / "bad.pt").read_bytes() == before


def test_scale_cpu_scores_mujoco_sub_trajectories_undiscounted():
    """--scale cpu sets gamma 1 on MuJoCo (results/grpo-keeps-peak); the paper's scale and Adroit keep Table 6's."""

    def gamma(env_id, *flags):
        a = tyro.cli(grpo_dt.Args, args=["--env-id", env_id, *flags])
        grpo_dt.apply_presets(a, 3, 1000)
        return a.gamma

    assert gamma("Hopper-v4") == 0.995
    assert gamma("Hopper-v4", "--scale", "cpu") == 1.0
    assert gamma("Walker2d-v4", "--scale", "cpu") == 1.0
    assert gamma("Hopper-v4", "--scale", "cpu", "--gamma", "0.995") == 0.995
    assert gamma("AdroitHandDoor-v1", "--dataset", "human", "--scale", "cpu") == 0.99
