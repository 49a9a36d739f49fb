"""Tests of grpo_dt_fast.py: it runs grpo_dt.py's algorithm with the same results on the CPU (the pruned policy
forward, pipelined workers, whole-stage steps), its update chunks add up to the whole batch, its flags are checked.
Its env step against gymnasium's: tests/test_fast_step.py."""

import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch
from test_grpo_dt import HOPPER, episodes, make_hopper_setup, same, scalars, tiny_args

import grpo_dt
import grpo_dt_fast


def pool(workers=0, stages=2, n=40, max_episode_steps=40):
    return grpo_dt_fast.EnvPool(
        grpo_dt_fast.Args(**HOPPER, max_episode_steps=max_episode_steps, num_workers=workers, pipeline_stages=stages), n
    )


@pytest.fixture(scope="module")
def hopper_setup(hopper_checkpoint):
    return make_hopper_setup(hopper_checkpoint)


@pytest.mark.parametrize("c", [1, 3])
def test_policy_step_is_the_full_forward_bit_for_bit(hopper_checkpoint, c):
    """The pruned forward gives the full forward's last-token outputs exactly, with left padding, at every batch size
    a rollout meets (members finish one by one); the full forward runs on a larger batch (64 more rows), so a member's
    output also does not depend on its batch. Unpadded batches under MIN_ROWS (evaluation) are the full forward on
    that very batch."""
    g = torch.Generator().manual_seed(c)
    model = grpo_dt.load_model(hopper_checkpoint)[0].eval()
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
            for a, b in zip(full, grpo_dt_fast.policy_step(model, *win)):
                assert torch.equal(a, b), B
            if B < grpo_dt_fast.MIN_ROWS:
                for a, b in zip(model(*win), grpo_dt_fast.policy_step(model, *win, pad_to=1)):
                    assert torch.equal(a[:, -1], b), B


def test_pipeline_stages_group_the_workers():
    """Members are dealt to the workers (member i to worker i % workers, so a group's members, which tend to finish
    together, spread over all of them) and --pipeline-stages S splits the workers into S contiguous stages (0, or
    more than the workers: one per worker); each stage holds its workers' members, in order."""
    envs = {s: pool(4, s, n=12, max_episode_steps=5) for s in (0, 2, 9)}
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


def test_pipelined_rollout_is_grpo_dts_rollout_bit_for_bit(hopper_setup):
    """Sampled and mean-action episodes, with members finishing at different steps, are bit-identical to grpo_dt's
    rollout on in-process gymnasium envs: in-process, with one stage per worker (2 workers), with 2 stages of 3 workers,
    and with the whole-stage step of --cuda-graphs (run eagerly on the CPU: finished members computed, not read)."""
    s, seeds = hopper_setup, np.arange(40) + 100
    ref = grpo_dt.Envs(s["args"], 40)
    runs = [
        [
            episodes(dataclasses.replace(s["policy"], gen=torch.Generator().manual_seed(3)), ref, seeds, 7200, 1, sampled=m)[0]
            for m in (True, False)
        ]
    ]
    ref.close()
    for workers, stages, whole in ((0, 0, False), (2, 0, False), (3, 2, False), (0, 0, True), (3, 2, True)):
        envs = pool(workers, stages)
        try:
            policy = dataclasses.replace(s["policy"], gen=torch.Generator().manual_seed(3))
            fast = functools.partial(grpo_dt_fast.rollout, whole_stages=whole)
            with pytest.MonkeyPatch.context() as m:
                m.setattr(grpo_dt, "rollout", fast)  # `episodes` (tests) rolls out through grpo_dt.rollout
                runs.append([episodes(policy, envs, seeds, 7200, 1, sampled=st)[0] for st in (True, False)])
        finally:
            envs.close()
    for pooled_runs in runs[1:]:
        for local, pooled in zip(runs[0], pooled_runs):
            assert local.keys() == pooled.keys()
            for k in local:
                np.testing.assert_array_equal(local[k], pooled[k], err_msg=k)
    lengths = runs[0][0]["valid"].sum(1)
    assert lengths.min() < lengths.max()  # members finished at different steps, so batches shrank unevenly


def test_whole_stage_step_collects_grpo_dts_groups(hopper_setup):
    """collect_groups from restored mid-episode states with c_online 3 (real context windows, not zeros), through the
    whole-stage step (eager on the CPU) and 2 stages of 2 workers: grpo_dt's buffer items, rewards and keep mask."""
    s, runs = hopper_setup, []
    envs = pool(2, 2, n=16)
    try:
        for e, roll in ((s["envs"], grpo_dt.rollout), (envs, functools.partial(grpo_dt_fast.rollout, whole_stages=True))):
            policy = dataclasses.replace(s["policy"], gen=torch.Generator().manual_seed(4))
            runs.append(grpo_dt.collect_groups(policy, e, s["trajs"], s["args"], np.random.default_rng(4), roll))
    finally:
        envs.close()
    (items, rewards, keep, out), (items_w, rewards_w, keep_w, out_w) = runs
    assert items.keys() == items_w.keys() and out.keys() == out_w.keys()
    for k in items:
        np.testing.assert_array_equal(items[k], items_w[k], err_msg=k)
    for k in out:
        np.testing.assert_array_equal(out[k], out_w[k], err_msg=k)
    np.testing.assert_array_equal(rewards, rewards_w)
    np.testing.assert_array_equal(keep, keep_w)
    assert items["mask"][:, :2].any()  # the context windows held real tokens


def test_cuda_graphs_only_with_the_policy_on_cuda(hopper_setup, monkeypatch):
    """--cuda-graphs (the default) acts through whole-stage graphs only where the policy is on CUDA; on the CPU the
    step over live members runs, and a whole-stage step built there runs eagerly (no graph)."""
    envs = pool(n=4)
    try:
        assert envs.graphs
        with monkeypatch.context() as m:
            m.setattr(grpo_dt_fast, "StageGraph", lambda *a, **kw: pytest.fail("a whole-stage step on the CPU"))
            obs, _ = envs.reset(range(4), [1, 2, 3, 4])
            grpo_dt_fast.rollout(
                hopper_setup["policy"], envs, grpo_dt.start_windows(hopper_setup["policy"], obs, 100, 1), 2, 0
            )
    finally:
        envs.close()
    win = [torch.zeros(4, 1, 1), torch.zeros(4, 1, 11), torch.zeros(4, 1, 3), torch.zeros(4, 1, dtype=torch.bool)]
    args = (win, np.array([1, 3]), torch.ones(4, 11), torch.ones(4), torch.zeros(4, 3), torch.zeros(1, dtype=torch.long))
    stage = grpo_dt_fast.StageGraph(hopper_setup["policy"], *args, T=2)
    assert stage.graph is None and stage().shape == (2, 3) and stage.hist["states"][0].eq(1).all()


def test_rollouts_leave_deterministic_mode_as_they_found_it(hopper_setup):
    """The pipelined rollout runs with torch's deterministic algorithms off (they only slow a GPU policy step) and gives
    the same episodes as with them on; the caller's setting is restored after, also when the rollout raises."""
    s, runs = hopper_setup, []
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    envs = pool(n=2)
    try:
        for mode in (False, True):
            torch.use_deterministic_algorithms(mode, warn_only=mode)
            policy = dataclasses.replace(s["policy"], gen=torch.Generator().manual_seed(5))
            obs, _ = envs.reset(range(2), [7, 8])
            runs.append(grpo_dt_fast.rollout(policy, envs, grpo_dt.start_windows(policy, obs, 7200, 1), 40, 0))
            assert torch.are_deterministic_algorithms_enabled() == mode
            assert torch.is_deterministic_algorithms_warn_only_enabled() == mode
        for k in runs[0]:
            np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)
        with pytest.raises(RuntimeError):
            with grpo_dt_fast.deterministic_algorithms_off():
                assert not torch.are_deterministic_algorithms_enabled()
                raise RuntimeError
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        envs.close()
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("ratio", ["sequence", "token"])
def test_update_chunks_add_up_to_the_whole_batch(hopper_setup, ratio, monkeypatch):
    """--update-chunk-steps (memory) splits a gradient update into chunks of whole sub-trajectories, each weighted by
    its share of sub-trajectories (surrogate) and of real steps (KL, entropy): the same gradient and stats as one
    chunk, here with uneven chunks and sub-trajectories of different lengths. Entropy is a one-sample estimate, so
    kappa is 0 and its stat is left out."""
    s = hopper_setup
    policy = dataclasses.replace(s["policy"], gen=torch.Generator().manual_seed(1))  # the same data in any test order
    args = dataclasses.replace(s["args"], eval_len=2)
    items, *_ = grpo_dt.collect_groups(policy, s["envs"], s["trajs"], args, np.random.default_rng(1))
    buf = grpo_dt.SubtrajBuffer(64, "cpu")
    buf.add(items)
    # float64: chunked and whole agree up to the order of the sums
    batch = {k: v.double() if v.is_floating_point() else v for k, v in buf.sample(16, np.random.default_rng(2)).items()}
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
        args = grpo_dt_fast.Args(**{**dataclasses.asdict(s["args"]), "clip_coef": 0.5, "kl_coef": 0.1, "ratio": ratio})
        _, stats = grpo_dt_fast.chunked_backward(
            model, ref, batch, dataclasses.replace(args, update_chunk_steps=chunk_steps), 0.0
        )
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


@pytest.mark.parametrize("flag", ["num_workers", "pipeline_stages", "update_chunk_steps"])
def test_its_flags_are_checked(hopper_checkpoint, tmp_path, flag):
    args = grpo_dt_fast.Args(
        **dataclasses.asdict(tiny_args(hopper_checkpoint, tmp_path)) | {"exp_name": "grpo_dt_fast", flag: -1}
    )
    with pytest.raises(grpo_dt.UserError, match=f"^--{flag.replace('_', '-')} must be >= 0, got -1$"):
        grpo_dt_fast.main(args)
    assert not (tmp_path / "runs").exists()


def test_fast_variant_runs_grpo_dt_bit_for_bit(hopper_checkpoint, tmp_path):
    """A short seeded CPU run of grpo_dt_fast.py, in-process and with 2 workers, gives grpo_dt.py's run bit for bit:
    the same groups (the sub-trajectory buffer), the same model, optimisers, rngs and logged scores."""
    flags = dict(save_every=1, delta_r=0.0, group_size=4, full_trajs_per_iter=2)
    grpo_dt.main(tiny_args(hopper_checkpoint, tmp_path / "ref", **flags))
    (state,) = (tmp_path / "ref" / "runs").glob("*/state.pt")
    reference, logged = torch.load(state, weights_only=False), scalars(tmp_path / "ref" / "runs")
    assert reference["finetune"]["sub_size"] > 0 and reference["finetune"]["grad_updates"] == 4
    for workers in (0, 2):
        base = dataclasses.asdict(tiny_args(hopper_checkpoint, tmp_path / f"w{workers}", **flags))
        grpo_dt_fast.main(grpo_dt_fast.Args(**base | {"exp_name": "grpo_dt_fast", "num_workers": workers}))
        (state,) = (tmp_path / f"w{workers}" / "runs").glob("*/state.pt")
        fast = torch.load(state, weights_only=False)
        assert (
            same(fast["state_dict"], reference["state_dict"])
            and fast["eval_normalized_score"] == reference["eval_normalized_score"]
        )
        for key in reference["finetune"].keys() - {"run_name"}:
            assert same(fast["finetune"][key], reference["finetune"][key]), (workers, key)
        assert scalars(tmp_path / f"w{workers}" / "runs").keys() == logged.keys()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for run in ("ref", "w0", "w2"):
        (d,) = (tmp_path / run / "runs").iterdir()
        acc = EventAccumulator(str(d))
        acc.Reload()
        values.append({t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t != "charts/SPS"})
    assert values[0] == values[1] == values[2]
