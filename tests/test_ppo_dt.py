"""Tests of ppo_dt.py: the algorithm pieces against slow references, rollout bookkeeping, and tiny end-to-end runs."""

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
from conftest import ROOT, check_checkpoint_loads
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_dt


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared CPU run far faster single-threaded; restored afterwards for other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scalars(runs_dir: Path) -> dict:
    """{tag: {step: value}} of the single run under runs_dir."""
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run)).Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def tiny_args(ckpt: Path, tmp_path: Path, env_id: str, dataset: str, **kw) -> ppo_dt.Args:
    tiny = dict(
        runs_dir=str(tmp_path / "runs"),
        num_iterations=2,
        k_ppo=2,
        n_batch=8,
        updates_per_iter=3,
        eval_episodes=1,
        max_episode_steps=25,
        value_hidden=32,
    )
    return ppo_dt.Args(env_id=env_id, dataset=dataset, checkpoint=str(ckpt), **{**tiny, **kw})


def small_rollout(model, ckpt, n=2, context_len=3, max_steps=12, seed=0):
    envs = [ppo_dt.make_env("Hopper-v4", max_episode_steps=max_steps) for _ in range(n)]
    plain = ckpt | dict(action_margin=1e-6, censor_bound=None)  # scored as the plain squashed Gaussian below
    return ppo_dt.rollout(model, envs, [seed + i for i in range(n)], 7200.0, plain, context_len, deterministic=False)


# ---------------------------------------------------------------- start
def test_checkpoint_loads_with_dropout_off(hopper_checkpoint):
    ckpt = check_checkpoint_loads(ppo_dt.load_model, hopper_checkpoint)
    model, _ = ppo_dt.load_model(hopper_checkpoint)
    assert ckpt["model_config"]["dropout"] > 0  # pretrained with dropout ...
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # ... finetuned without
    assert all(b.dropout == 0 for b in model.blocks)


def test_dim_mismatch_is_a_one_line_error(hopper_checkpoint, tmp_path):
    args = tiny_args(hopper_checkpoint, tmp_path, "Walker2d-v4", "medium")
    with pytest.raises(ppo_dt.UserError, match=r"dims \(11, 3\).*\(17, 6\)"):
        ppo_dt.main(args)
    with pytest.raises(ppo_dt.UserError, match="unknown --env-id 'Hopper-v9'"):
        ppo_dt.main(tiny_args(hopper_checkpoint, tmp_path, "Hopper-v9", "medium"))
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_missing_default_checkpoint_is_pretrained_by_subprocess_at_the_scale(tmp_path, monkeypatch):
    """No --checkpoint: `checkpoints/...__cpu.pt` for --scale cpu is pretrained with pretrain_dt.py's cpu preset (context
    10), the extra flags on top; the next call reuses it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    extra = "--num-updates 2 --batch-size 4 --warmup-updates 1 --embed-dim 16 --n-layers 1 --n-heads 1 --eval-episodes 1"
    args = ppo_dt.Args(
        env_id="Hopper-v4", dataset="local/hopper/medium-v0", scale="cpu", runs_dir=str(tmp_path), pretrain_extra_args=extra
    )
    path = ppo_dt.ensure_checkpoint(args)
    assert path == Path("checkpoints/Hopper-v4__local-hopper-medium-v0__s1__cpu.pt")
    _, ckpt = ppo_dt.load_model(path)
    assert ckpt["num_updates"] == 2 and ckpt["model_config"]["embed_dim"] == 16 and ckpt["model_config"]["c_offline"] == 10
    monkeypatch.setattr(ppo_dt.subprocess, "run", None)  # a second pretraining would crash
    assert ppo_dt.ensure_checkpoint(args) == path


def test_explicit_missing_checkpoint_is_a_one_line_error_and_nothing_is_pretrained(tmp_path, monkeypatch):
    monkeypatch.setattr(ppo_dt.subprocess, "run", None)
    args = tiny_args(tmp_path / "nope.pt", tmp_path, "Hopper-v4", "local/hopper/medium-v0")
    with pytest.raises(ppo_dt.UserError, match=r"^--checkpoint '.*nope.pt' does not exist$"):
        ppo_dt.main(args)
    assert not (tmp_path / "runs").exists()


def test_failed_pretraining_subprocess_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ppo_dt.sys, "executable", "false")  # a pretraining process that exits 1
    args = ppo_dt.Args(env_id="Hopper-v4", dataset="local/hopper/medium-v0", pretrain_extra_args="--num-updates 3")
    with pytest.raises(ppo_dt.UserError, match=r"pretraining failed, no checkpoint at checkpoints/Hopper-v4__.*__s1.pt"):
        ppo_dt.ensure_checkpoint(args)


def preset(env_id, dataset, **kw):
    return ppo_dt.apply_presets(ppo_dt.Args(env_id=env_id, dataset=dataset, **kw))


def test_table7_presets():
    hop = preset("Hopper-v4", "local/hopper/medium-v0")
    assert (hop.n_batch, hop.c_online, hop.g_online, hop.k_ppo, hop.learning_rate, hop.lr_value, hop.kappa_initial) == (
        256,
        1,
        7200,
        8,
        5e-5,
        1e-3,
        0.02,
    )
    assert hop.c_train == 1
    assert preset("Hopper-v4", "random").kappa_initial == 0.04
    assert preset("Walker2d-v4", "mujoco/walker2d/random-v0").kappa_initial == 0.20
    door = preset("AdroitHandDoor-v1", "local/door/human-v0")
    assert (door.n_batch, door.k_ppo, door.lr_value, door.kappa_initial) == (512, 16, 2e-4, 0.002)
    assert preset("AdroitHandHammer-v1", "cloned").c_online == 5
    assert preset("AntMaze_UMaze-v4", "umaze-diverse").c_online == 5
    given = preset("Hopper-v4", "medium", learning_rate=1e-3, g_online=100.0, c_online=3)  # flags beat the row
    assert (given.learning_rate, given.g_online, given.c_online, given.c_train) == (1e-3, 100.0, 3, 3)


# ---------------------------------------------------------------- GAE and advantages
def gae_reference(rewards, values, last_value, terminated, gamma, lam):
    """Eq. 4 written out as its double sum."""
    T = len(rewards)
    v = np.append(values, 0.0 if terminated else last_value)
    return np.array(
        [sum((gamma * lam) ** l * (rewards[h + l] + gamma * v[h + l + 1] - v[h + l]) for l in range(T - h)) for h in range(T)]
    )


@pytest.mark.parametrize("terminated", [False, True])
def test_gae_matches_slow_reference(terminated):
    rng = np.random.default_rng(0)
    for T in (1, 7, 60):
        r, v, last = rng.normal(size=T), rng.normal(size=T), rng.normal()
        got = ppo_dt.compute_gae(r, v, last, terminated, gamma=0.99, lam=0.95)
        np.testing.assert_allclose(got, gae_reference(r, v, last, terminated, 0.99, 0.95), rtol=1e-5, atol=1e-5)


def test_gae_bootstraps_truncation_not_termination():
    r, v, last, gamma = np.array([1.0, 2.0]), np.array([0.5, 3.0]), 10.0, 0.9
    truncated = ppo_dt.compute_gae(r, v, last, terminated=False, gamma=gamma, lam=1.0)
    terminated = ppo_dt.compute_gae(r, v, last, terminated=True, gamma=gamma, lam=1.0)
    assert truncated[-1] == pytest.approx(2.0 + gamma * 10.0 - 3.0)  # bootstraps from V(s_T)
    assert terminated[-1] == pytest.approx(2.0 - 3.0)  # V(s_T) = 0 after a true termination
    assert truncated[0] - terminated[0] == pytest.approx(gamma * gamma * 10.0)


def test_policy_loss_clips_and_has_unit_ratio_when_equal():
    logp = torch.randn(16)
    adv = torch.randn(16)
    loss, approx_kl, clipfrac = ppo_dt.ppo_policy_loss(logp, logp, adv, 0.2)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6) and approx_kl == 0 and clipfrac == 0
    new = torch.full((4,), 1.0, requires_grad=True)  # ratio e > 1.2 with positive advantage: clipped, no gradient
    loss, _, clipfrac = ppo_dt.ppo_policy_loss(new, torch.zeros(4), torch.ones(4), 0.2)
    loss.backward()
    assert clipfrac == 1 and loss.item() == pytest.approx(-1.2) and new.grad.abs().sum() == 0


def test_value_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    net = ppo_dt.ValueNet(11, 64, layer_norm=True, scale=100.0)
    states, targets = torch.randn(64, 11), torch.randn(64) * 80 + 150
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    first = torch.nn.functional.mse_loss(net(states), targets).item()
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(net(states), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


# ---------------------------------------------------------------- rollout bookkeeping
def test_rollout_keeps_rollout_rtgs_and_ratio_is_one(hopper_checkpoint):
    torch.manual_seed(0)
    model, ckpt = ppo_dt.load_model(hopper_checkpoint)
    seen = []  # the RTG token at the newest slot of every live member, as the policy saw it
    hook = model.register_forward_hook(lambda m, inp, out: seen.append(inp[0][:, -1, 0].clone()))
    trajs = small_rollout(model, ckpt)
    hook.remove()
    for j, t in enumerate(trajs):
        assert len(t["rewards"]) <= 12 and (t["terminated"] or len(t["rewards"]) == 12)  # the cap truncates
        fed = np.array([s[j].item() for s in seen[: len(t["rewards"])]])
        np.testing.assert_allclose(t["rtg"], fed, rtol=0, atol=1e-6)
        expected = 7.2 - ckpt["rtg_scale"] * np.concatenate([[0], np.cumsum(t["rewards"])[:-1]])
        np.testing.assert_allclose(t["rtg"], expected, atol=1e-5)
    value_net = ppo_dt.ValueNet(11, 32, layer_norm=False, scale=1.0)
    gae = dict(gamma=0.99, lam=0.95, rtg_scale=ckpt["rtg_scale"])
    kept = ppo_dt.flatten_buffer(trajs, value_net, **gae, relabel=False)
    np.testing.assert_array_equal(kept["rtg"], np.concatenate([t["rtg"] for t in trajs]))
    relabeled = ppo_dt.flatten_buffer(trajs, value_net, **gae, relabel=True)
    suffix = np.concatenate([np.cumsum(t["rewards"][::-1])[::-1] * ckpt["rtg_scale"] for t in trajs])
    np.testing.assert_allclose(relabeled["rtg"], suffix, rtol=1e-5)
    assert np.abs(relabeled["rtg"] - kept["rtg"]).min() > 1.0  # g_actual is far below g_online = 7200

    # Every token of sampled sub-trajectories, scored under its rollout context, reproduces the rollout log-prob.
    b = ppo_dt.sample_batch(kept, 16, sub_len=4, context_len=3, rng=np.random.default_rng(0), device="cpu")
    assert b["rtg"].shape[1:] == (3, 1) and not b["mask"][:, -1].logical_not().any()
    assert abs(b["adv"].mean().item()) < 1e-5 and b["adv"].std().item() == pytest.approx(1.0, abs=1e-5)  # normalised
    mean, log_std = (x[:, -1] for x in model(b["rtg"], b["states"], b["actions"], b["mask"]))
    new_logp = ppo_dt.squashed_gaussian(mean, log_std).log_prob(b["actions"][:, -1])
    torch.testing.assert_close(new_logp, b["logp"], rtol=1e-4, atol=1e-4)
    _, approx_kl, clipfrac = ppo_dt.ppo_policy_loss(new_logp, b["logp"], b["adv"], 0.2)
    assert approx_kl.abs() < 1e-6 and clipfrac == 0
    # The same batch under relabeled RTG tokens no longer matches the rollout log-probs: the paper's failure.
    rb = ppo_dt.sample_batch(relabeled, 16, sub_len=4, context_len=3, rng=np.random.default_rng(0), device="cpu")
    mean, log_std = (x[:, -1] for x in model(rb["rtg"], rb["states"], rb["actions"], rb["mask"]))
    assert not torch.allclose(ppo_dt.squashed_gaussian(mean, log_std).log_prob(rb["actions"][:, -1]), rb["logp"], atol=1e-3)


def test_rollouts_reproduce_with_the_seed(hopper_checkpoint):
    model, ckpt = ppo_dt.load_model(hopper_checkpoint)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(small_rollout(model, ckpt, seed=5))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a["actions"], b["actions"])
        np.testing.assert_array_equal(a["rewards"], b["rewards"])


# ---------------------------------------------------------------- end to end
def test_end_to_end_hopper_with_save_and_resume(hopper_checkpoint, tmp_path):
    save = tmp_path / "ft.pt"
    args = tiny_args(hopper_checkpoint, tmp_path, "Hopper-v4", "local/hopper/medium-v0", save_every=1, save_path=str(save))
    score = ppo_dt.main(args)
    s = scalars(tmp_path / "runs")
    assert sorted(s["charts/normalized_score"]) == [0, 1, 2] and s["charts/normalized_score"][2] == pytest.approx(score)
    for tag in ("policy_loss", "value_loss", "explained_variance", "approx_kl", "clipfrac", "entropy", "kappa", "kl_ref"):
        assert sorted(s[f"losses/{tag}"]) == [1, 2] and np.isfinite(list(s[f"losses/{tag}"].values())).all()
    assert s["charts/grad_updates"] == {1: 3, 2: 6}
    assert 0 < s["charts/env_steps"][1] <= 50 and s["charts/env_steps"][2] > s["charts/env_steps"][1]
    assert s["losses/kappa"][1] != pytest.approx(0.02, abs=1e-9)  # the dual variable moves
    ckpt = torch.load(save, weights_only=False)
    assert ckpt["finetune"]["iteration"] == 2 and len(ckpt["finetune"]["buffer"]) == 4  # 2 x K_PPO, buffer 4 x K_PPO
    ppo_dt.load_model(save)  # the finetuned checkpoint keeps the pretrained format

    ppo_dt.main(ppo_dt.Args(resume=str(save), num_iterations=3))
    ckpt = torch.load(save, weights_only=False)
    assert ckpt["finetune"]["iteration"] == 3 and ckpt["finetune"]["grad_updates"] == 9
    assert len(ckpt["finetune"]["buffer"]) == 6


def test_end_to_end_door_with_relabel(door_checkpoint, tmp_path):
    args = tiny_args(door_checkpoint, tmp_path, "AdroitHandDoor-v1", "local/door/human-v0", relabel=True)
    ppo_dt.main(args)
    s = scalars(tmp_path / "runs")
    assert sorted(s["charts/normalized_score"]) == [0, 1, 2]
    assert s["charts/env_steps"] == {1: 50, 2: 100}  # Door never terminates early: 2 x 25 steps
    assert np.isfinite(list(s["losses/value_loss"].values())).all()


def test_zero_iterations_only_evaluates(hopper_checkpoint, tmp_path):
    ppo_dt.main(tiny_args(hopper_checkpoint, tmp_path, "Hopper-v4", "local/hopper/medium-v0", num_iterations=0))
    s = scalars(tmp_path / "runs")
    assert s["charts/normalized_score"].keys() == {0} and "losses/policy_loss" not in s


def test_iteration_zero_is_the_pretrained_score(hopper_checkpoint, tmp_path):
    """pretrain_dt.py scores at c_online, so its reported score is where finetuning starts."""
    ckpt = torch.load(hopper_checkpoint, weights_only=False)
    score = ppo_dt.main(
        tiny_args(hopper_checkpoint, tmp_path, "Hopper-v4", "local/hopper/medium-v0", num_iterations=0, max_episode_steps=None)
    )
    assert score == pytest.approx(ckpt["eval_normalized_score"], abs=1e-6)


# ---------------------------------------------------------------- flags, run state, non-finite guard
@pytest.mark.parametrize(
    "flag", [dict(learning_rate=1e-2), dict(kl_coef=100.0), dict(updates_per_iter=1), dict(value_scale=1.0)]
)
def test_renamed_flags_change_the_finetuned_policy(hopper_checkpoint, tmp_path, flag):
    def final_state(sub, **kw):
        args = tiny_args(
            hopper_checkpoint,
            tmp_path / sub,
            "Hopper-v4",
            "local/hopper/medium-v0",
            num_iterations=1,
            save_path=str(tmp_path / sub / "state.pt"),
            ref_update_every=100,
            **kw,
        )
        ppo_dt.main(args)
        return torch.load(tmp_path / sub / "state.pt", weights_only=False)

    base, changed = final_state("base"), final_state("changed", **flag)
    assert any(not torch.equal(base["state_dict"][k], v) for k, v in changed["state_dict"].items())
    if "updates_per_iter" in flag:
        assert (base["finetune"]["grad_updates"], changed["finetune"]["grad_updates"]) == (3, 1)


def test_run_state_is_saved_by_default_and_save_model_writes_a_checkpoint(hopper_checkpoint, tmp_path, capsys):
    args = tiny_args(hopper_checkpoint, tmp_path, "Hopper-v4", "local/hopper/medium-v0", save_model=True)
    assert args.save_every == 5 and args.save_path is None
    ppo_dt.main(args)
    (state,) = (tmp_path / "runs").glob("*/state.pt")
    assert f"run state: {state}" in capsys.readouterr().out
    assert torch.load(state, weights_only=False)["finetune"]["iteration"] == 2  # the last iteration is always saved
    model, ckpt = ppo_dt.load_model(state.parent / "ppo_dt.pt")
    assert "finetune" not in ckpt and "args" not in ckpt
    assert torch.equal(ckpt["state_dict"]["mean_head.bias"], model.mean_head.bias)
    ppo_dt.main(tiny_args(hopper_checkpoint, tmp_path / "no", "Hopper-v4", "local/hopper/medium-v0", save_every=0))
    assert "run state" not in capsys.readouterr().out and not list((tmp_path / "no").rglob("*.pt"))


def test_killed_run_resumes_bit_exactly(hopper_checkpoint, tmp_path, capsys):
    n = 8
    straight = tiny_args(
        hopper_checkpoint, tmp_path / "a", "Hopper-v4", "local/hopper/medium-v0", num_iterations=n, save_every=1
    )
    ppo_dt.main(dataclasses.replace(straight, save_path=str(tmp_path / "a.pt")))
    state = tmp_path / "b.pt"
    flags = dataclasses.asdict(dataclasses.replace(straight, runs_dir=str(tmp_path / "b"), save_path=str(state)))
    defaults = dataclasses.asdict(ppo_dt.Args())
    cmd = [sys.executable, str(ROOT / "ppo_dt.py")]
    cmd += [x for k, v in flags.items() if v != defaults[k] for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as this process's torch
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved, deadline = 0, time.time() + 120
    while saved < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
        if state.exists():
            saved = torch.load(state, weights_only=False)["finetune"]["iteration"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(state, weights_only=False)["finetune"]["iteration"]
    assert 2 <= saved < n, "the run was not killed mid-way"
    capsys.readouterr()
    ppo_dt.main(ppo_dt.Args(resume=str(state)))  # the run's own settings, budget included
    out = capsys.readouterr().out
    assert f"iteration {saved + 1}: eval return" in out and f"iteration {saved}: eval return" not in out
    a, b = (torch.load(p, weights_only=False) for p in (tmp_path / "a.pt", state))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for k in ("iteration", "env_steps", "grad_updates"):
        assert a["finetune"][k] == b["finetune"][k], k
    assert a["finetune"]["rng"].bit_generator.state == b["finetune"]["rng"].bit_generator.state
    assert torch.equal(a["finetune"]["log_kappa"], b["finetune"]["log_kappa"])
    for k, v in a["finetune"]["value_net"].items():
        assert torch.equal(v, b["finetune"]["value_net"][k]), k


def test_resume_keeps_the_runs_budget_and_logs_each_step_once(hopper_checkpoint, tmp_path, monkeypatch):
    """A run state of iteration 1 (after iteration 2 was logged): resumed without flags it redoes iteration 2 (its own
    --num-iterations, not the default), TensorBoard holding every step once with the straight run's values; a budget
    flag extends it; any other flag is a one-line error."""
    state, first = tmp_path / "state.pt", tmp_path / "it1.pt"
    real_save = ppo_dt.save_atomic

    def keep_iteration_1(path, payload):
        real_save(path, payload)
        if payload["finetune"]["iteration"] == 1:
            real_save(first, payload)

    monkeypatch.setattr(ppo_dt, "save_atomic", keep_iteration_1)
    args = tiny_args(hopper_checkpoint, tmp_path, "Hopper-v4", "local/hopper/medium-v0", save_every=1, save_path=str(state))
    ppo_dt.main(args)
    straight = scalars(tmp_path / "runs")
    ppo_dt.main(ppo_dt.Args(resume=str(first)))
    assert torch.load(state, weights_only=False)["finetune"]["iteration"] == 2
    (run,) = (tmp_path / "runs").iterdir()
    acc = EventAccumulator(str(run)).Reload()
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), tag
    resumed = scalars(tmp_path / "runs")
    assert resumed["charts/normalized_score"].keys() == {0, 1, 2}
    assert all(resumed[tag] == values for tag, values in straight.items() if tag != "charts/SPS")
    ppo_dt.main(ppo_dt.Args(resume=str(state), num_iterations=3))
    assert torch.load(state, weights_only=False)["finetune"]["iteration"] == 3
    only = "only --num-iterations, --total-env-steps, --max-seconds may change, not --k-ppo"
    with pytest.raises(ppo_dt.UserError, match=only):
        ppo_dt.main(ppo_dt.Args(resume=str(state), num_iterations=4, k_ppo=3))
    with pytest.raises(ppo_dt.UserError, match="is not a run state of ppo_dt.py"):
        ppo_dt.main(ppo_dt.Args(resume=str(hopper_checkpoint)))


@pytest.mark.parametrize("budget", [dict(total_env_steps=1), dict(max_seconds=1e-9)])
def test_a_budget_stops_after_the_iteration_that_reaches_it_and_saves(hopper_checkpoint, tmp_path, budget):
    state = tmp_path / "state.pt"
    args = tiny_args(hopper_checkpoint, tmp_path, "Hopper-v4", "local/hopper/medium-v0", num_iterations=5, **budget)
    ppo_dt.main(dataclasses.replace(args, save_path=str(state)))
    assert scalars(tmp_path / "runs")["charts/normalized_score"].keys() == {0, 1}
    assert torch.load(state, weights_only=False)["finetune"]["iteration"] == 1


@pytest.mark.parametrize(
    "flag, value, rule",
    [
        ("learning_rate", -1.0, "> 0"),
        ("lr_value", 0.0, "> 0"),
        ("k_ppo", 0, "> 0"),
        ("n_batch", 0, "> 0"),
        ("updates_per_iter", 0, "> 0"),
        ("eval_episodes", 0, "> 0"),
        ("kappa_initial", 0.0, "> 0"),
        ("num_iterations", -1, ">= 0"),
        ("gamma", 1.5, "in [0, 1]"),
    ],
)
def test_bad_input_is_a_one_line_error_and_nothing_runs(hopper_checkpoint, tmp_path, flag, value, rule):
    args = tiny_args(hopper_checkpoint, tmp_path, "Hopper-v4", "local/hopper/medium-v0", **{flag: value})
    with pytest.raises(ppo_dt.UserError) as e:
        ppo_dt.main(args)
    assert str(e.value) == f"--{flag.replace('_', '-')} must be {rule}, got {value}"
    assert not (tmp_path / "runs").exists()


def test_command_line_error_is_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "ppo_dt.py"), "--k-ppo", "0", "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == "error: --k-ppo must be > 0, got 0\n" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("what", ["policy loss", "value weight"])
def test_non_finite_stops_and_keeps_the_last_good_state(hopper_checkpoint, tmp_path, monkeypatch, what):
    """A NaN policy loss, or a NaN value-net weight, in iteration 2 stops the run before its state is saved."""
    state, calls = tmp_path / "state.pt", []
    if what == "policy loss":  # 3 updates per iteration: the 4th is iteration 2's first
        real = ppo_dt.ppo_policy_loss

        def nan_loss(*a, **kw):
            calls.append(1)
            loss, kl, clipfrac = real(*a, **kw)
            return (loss * float("nan") if len(calls) > 3 else loss), kl, clipfrac

        monkeypatch.setattr(ppo_dt, "ppo_policy_loss", nan_loss)
    else:
        real = ppo_dt.ppo_update

        def poison_value_net(learner, *a, **kw):
            calls.append(1)
            stats = real(learner, *a, **kw)
            if len(calls) == 4:
                with torch.no_grad():
                    learner.value_net.net[-1].bias.fill_(float("nan"))
            return stats

        monkeypatch.setattr(ppo_dt, "ppo_update", poison_value_net)
    args = tiny_args(hopper_checkpoint, tmp_path, "Hopper-v4", "local/hopper/medium-v0", num_iterations=3, save_every=1)
    with pytest.raises(ppo_dt.UserError) as e:
        ppo_dt.main(dataclasses.replace(args, save_path=str(state)))
    assert str(e.value) == f"non-finite weights after iteration 2; stopped, last good state kept at {state}"
    kept = torch.load(state, weights_only=False)
    assert kept["finetune"]["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values())
    assert all(torch.isfinite(v).all() for v in kept["finetune"]["value_net"].values())


def test_training_seeds_are_never_evaluation_seeds(hopper_checkpoint, tmp_path, monkeypatch):
    """Training episodes reset from the run's generator, outside every run seed's `eval_seeds` (seed * 1_000_003 + ...
    used to put run seed 1's training episodes on run seed 10's evaluation episodes)."""
    evaluation = {int(x) for s in range(21) for x in ppo_dt.eval_seeds(s, 10_000)}
    for s in range(21):
        drawn = ppo_dt.train_seeds(np.random.default_rng(s), 10_000)
        assert not evaluation & set(drawn.tolist()) and (drawn % 100_000 >= 50_000).all() and (drawn < 2**31).all()
    used, rollout = [], ppo_dt.rollout

    def record(model, envs, seeds, *a, **kw):
        if not kw["deterministic"]:
            used.extend(int(x) for x in seeds)
        return rollout(model, envs, seeds, *a, **kw)

    monkeypatch.setattr(ppo_dt, "rollout", record)
    for seed in (1, 10):
        ppo_dt.main(tiny_args(hopper_checkpoint, tmp_path / str(seed), "Hopper-v4", "local/hopper/medium-v0", seed=seed))
    assert len(used) == 2 * 2 * 2 and not evaluation & set(used)
