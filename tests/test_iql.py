"""iql.py: the expectile loss, the advantage weights, TD targets at truncation vs termination, the offline + online
replay, offline transitions, exact resume, non-finite losses, bad input, and end-to-end runs on the tests' tiny data."""

import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import iql as M

TINY = dict(hidden_dim=16, batch_size=16, offline_updates=30, eval_episodes=1, max_episode_steps=15, eval_every=20)
HOPPER = dict(env_id="Hopper-v4", dataset="local/hopper/medium-v0")
DOOR = dict(env_id="AdroitHandDoor-v1", dataset="local/door/human-v0")


def run(tmp_path, **kw):
    return M.main(M.Args(runs_dir=str(tmp_path / "runs"), **{**HOPPER, **TINY, **kw}))


def scalars(run_dir) -> dict:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def logged(run_dir, tag) -> list:
    """Every (step, value) TensorBoard shows for `tag`, duplicates included."""
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ---------------------------------------------------------------- losses
def test_expectile_loss_is_its_definition_and_pulls_v_up():
    diff = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    expected = np.mean([(0.3 if d < 0 else 0.7) * d**2 for d in diff.tolist()])
    assert M.expectile_loss(diff, 0.7).item() == pytest.approx(expected)
    # diff = Q - V: an underestimating V (diff > 0) costs 0.7, an overestimating one 0.3.
    assert M.expectile_loss(torch.tensor([1.0]), 0.7).item() == pytest.approx(0.7)
    assert M.expectile_loss(torch.tensor([-1.0]), 0.7).item() == pytest.approx(0.3)
    # So the best constant V over samples of Q is their 0.7-expectile, above their mean: the fixed point
    # v = sum(w q) / sum(w), w = 0.7 where q > v and 0.3 below, where the loss's gradient vanishes.
    q, v = torch.tensor([0.0, 1.0, 2.0, 10.0]), torch.tensor(0.0)
    for _ in range(50):
        w = torch.where(q > v, 0.7, 0.3)
        v = (w * q).sum() / w.sum()
    v.requires_grad_(True)
    M.expectile_loss(q - v, 0.7).backward()
    assert v.item() > q.mean().item() + 1 and abs(v.grad.item()) < 1e-6
    for other in (v.item() - 0.1, v.item() + 0.1, q.mean().item()):
        assert M.expectile_loss(q - other, 0.7) > M.expectile_loss(q - v.detach(), 0.7)
    assert M.expectile_loss(q - 0.5, 0.5).item() == pytest.approx(0.5 * ((q - 0.5) ** 2).mean().item())


def test_advantage_weights_are_exp_beta_adv_clipped_at_100():
    adv, log_prob = torch.tensor([-1.0, 0.0, 0.5, 1.0, 50.0]), -torch.eye(5)  # row i: the NLL of sample i alone is 1
    w = torch.stack([M.awr_loss(log_prob[i], adv, beta=3.0) * 5 for i in range(5)])  # so 5 x loss is its weight
    torch.testing.assert_close(w[:3], torch.exp(3.0 * adv[:3]))
    assert w[3].item() == pytest.approx(np.exp(3.0)) and w[4].item() == 100.0
    # The actor loss is that weight times the data action's NLL, and sends no gradient into the advantage.
    log_prob, adv = torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([0.0, 10.0], requires_grad=True)
    loss = M.awr_loss(log_prob, adv, beta=3.0)
    assert loss.item() == pytest.approx((1.0 * 1.0 + 100.0 * 2.0) / 2)
    loss.backward()
    assert adv.grad is None and log_prob.grad.tolist() == [-0.5, -50.0]


def test_td_target_truncation_bootstraps_termination_cuts():
    rewards, next_v = torch.tensor([1.0, 1.0, 2.0]), torch.tensor([10.0, 10.0, 4.0])
    terminals = torch.tensor([False, True, False])  # step 0: time-limit end (not terminal); step 1: the robot fell
    torch.testing.assert_close(M.td_target(rewards, terminals, next_v, 0.9), torch.tensor([10.0, 1.0, 5.6]))
    q1, q2 = torch.tensor([10.0, 1.0, 5.6]), torch.tensor([11.0, 1.0, 5.6])
    assert M.q_loss(q1, q2, M.td_target(rewards, terminals, next_v, 0.9)).item() == pytest.approx(1 / 3)


def test_online_time_limit_ends_are_stored_as_not_terminal(tmp_path):
    out = run(tmp_path, online_steps=24, eval_every=24, offline_updates=5, max_episode_steps=8)
    online = torch.load(out["state_path"], weights_only=False)["buffer"]["online"]
    assert out["episode"] == 3  # three 8-step episodes, each ended by the time limit (too short to fall)...
    assert not online["terminals"].any()  # ...and none stored as a termination, so their TD targets bootstrap
    # Within an episode, s' of one transition is s of the next; across the reset it is not.
    np.testing.assert_array_equal(online["next_observations"][:7], online["observations"][1:8])
    assert not np.array_equal(online["next_observations"][7], online["observations"][8])


def test_offline_transitions_from_a_d4rl_file(tmp_path):
    n = 9
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[2], timeouts[5] = True, True  # episodes [0, 3) ends by a fall, [3, 6) by the time limit, [6, 9) cut
    path = tmp_path / "hopper-tiny.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.arange(n, dtype=np.float64)[:, None].repeat(11, 1)
        f["actions"] = np.zeros((n, 3))
        f["rewards"] = np.arange(n, dtype=np.float64)
        f["terminals"], f["timeouts"] = terminals, timeouts
    args = M.Args(env_id="Hopper-v4", dataset="x", dataset_path=str(path), online_steps=0)
    t = M.load_offline(args, "mujoco", M.make_env("Hopper-v4"))["offline"]
    # The timeout's and the file's last s' are unknown, so those rows go; the fall keeps its row, as terminal.
    assert t["rewards"].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert t["terminals"].tolist() == [False, False, True, False, False, False, False]
    np.testing.assert_array_equal(t["next_observations"][:, 0], [1, 2, 3, 4, 5, 7, 8])


def test_minari_transitions_keep_every_step_with_its_next_observation():
    _, trajs, _, _ = M.load_dataset(**HOPPER, dataset_path=None, random_steps=0, seed=0)
    t = M.load_offline(M.Args(**HOPPER), "mujoco", M.make_env(HOPPER["env_id"]))["offline"]
    assert len(t["rewards"]) == sum(len(x["rewards"]) for x in trajs)  # every step, the last of each episode too
    np.testing.assert_array_equal(t["observations"], np.concatenate([x["observations"] for x in trajs]))
    np.testing.assert_array_equal(t["rewards"], np.concatenate([x["rewards"] for x in trajs]))
    n0 = len(trajs[0]["rewards"])  # within an episode s' is the next s; the last step has its own s'
    np.testing.assert_array_equal(t["next_observations"][: n0 - 1], t["observations"][1:n0])
    assert not np.array_equal(t["next_observations"][n0 - 1], t["observations"][n0])
    assert t["terminals"].sum() == sum(x["terminals"].sum() for x in trajs) > 0  # the falls stay terminal


# ---------------------------------------------------------------- replay, presets, seeds
def test_buffer_mixes_offline_and_online_and_keeps_offline_data():
    offline = dict(observations=np.zeros((50, 2), np.float32), rewards=np.zeros(50, np.float32))
    buf = M.ReplayBuffer({k: v.copy() for k, v in offline.items()}, capacity=50 + 8, seed=0)
    for i in range(1, 21):  # 20 online transitions into 8 online slots: FIFO keeps the last 8
        buf.add(observations=np.full(2, i), rewards=float(i))
    batch = buf.sample(4000)["rewards"]
    assert (batch == 0).any() and (batch > 0).any()  # both sources in one batch
    assert set(batch[batch > 0].tolist()) == set(range(13, 21))  # the oldest online ones were replaced
    assert np.mean(batch > 0) == pytest.approx(8 / 58, abs=0.02)  # uniform over the 58 transitions
    for k, v in offline.items():  # the offline part is never overwritten
        np.testing.assert_array_equal(buf.data[k][:50], v)
    restored = M.ReplayBuffer({k: v.copy() for k, v in offline.items()}, capacity=58, seed=1)
    restored.load_state_dict(buf.state_dict())  # the online part and the state of the sampling generator
    np.testing.assert_array_equal(restored.sample(100)["rewards"], buf.sample(100)["rewards"])


def test_family_presets_and_reward_transform():
    door, fam = M.check(M.Args(env_id="AdroitHandDoor-v1"))
    assert fam == "adroit" and (door.expectile, door.beta, door.actor_dropout, door.normalize_reward) == (0.8, 3.0, 0.1, False)
    ant, fam = M.check(M.Args(env_id="AntMaze_UMaze-v4"))
    assert fam == "antmaze" and (ant.expectile, ant.beta, ant.normalize_reward) == (0.9, 10.0, True)
    hopper, _ = M.check(M.Args(expectile=0.6))
    assert (hopper.expectile, hopper.beta, hopper.normalize_reward) == (0.6, 3.0, True)  # a flag wins over the preset
    returns = np.array([100.0, 600.0, 300.0])
    assert M.reward_transform("mujoco", returns, True) == (2.0, 0.0)  # 1000 / (600 - 100)
    assert M.reward_transform("antmaze", returns, True) == (1.0, -1.0)
    assert M.reward_transform("adroit", returns, False) == (1.0, 0.0)


def test_eval_seeds_differ_across_run_seeds():
    assert M.eval_seeds(1, 3).tolist() == [100_000, 100_001, 100_002]
    assert not set(M.eval_seeds(1, 50)) & set(M.eval_seeds(2, 50))
    assert len({M.train_episode_seed(s, e) for s in (1, 2) for e in range(100)} | set(M.eval_seeds(1, 10))) == 210


# ---------------------------------------------------------------- runs
def test_resume_is_exact(tmp_path):
    straight = run(tmp_path / "a", online_steps=40)
    # The same run stopped at 23 env steps (mid-episode: episodes are 15 steps), then resumed in a new main().
    first = run(tmp_path / "b", online_steps=40, total_env_steps=23)
    assert first["env_steps"] == 23 and first["episode_actions"]
    resumed = M.main(M.Args(resume=str(first["state_path"]), total_env_steps=40))  # a budget flag: lifts the 23
    assert resumed["env_steps"] == straight["env_steps"] == 40 and resumed["run_dir"] == first["run_dir"]
    assert resumed["score"] == straight["score"]
    for (k, a), b in zip(straight["agent"].state_dict().items(), resumed["agent"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    sa, sb = (torch.load(r["state_path"], weights_only=False) for r in (straight, resumed))
    for k, v in sa["buffer"]["online"].items():
        np.testing.assert_array_equal(v, sb["buffer"]["online"][k])
    assert sa["buffer"]["rng"] == sb["buffer"]["rng"] and torch.equal(sa["torch_rng"], sb["torch_rng"])
    assert sa["optimizer"]["state"][0]["step"] == sb["optimizer"]["state"][0]["step"]


def test_budgets_stop_the_online_phase(tmp_path):
    assert run(tmp_path, online_steps=40, max_seconds=1e-9)["env_steps"] == 1  # counted from the online start
    assert run(tmp_path, online_steps=40, total_env_steps=7)["env_steps"] == 7
    assert run(tmp_path, online_steps=0)["env_steps"] == 0  # offline IQL only


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    real, calls = M.q_loss, []

    def poisoned(*a):  # a NaN Q loss at the 26th online update, after the state saved at env step 20
        calls.append(1)
        return real(*a) * (float("nan") if len(calls) == TINY["offline_updates"] + 26 else 1.0)

    monkeypatch.setattr(M, "q_loss", poisoned)
    with pytest.raises(M.UserError) as err:
        run(tmp_path, online_steps=40)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("non-finite qf_loss at online step 26") and "last good state kept" in msg
    state = torch.load(next((tmp_path / "runs").glob("*/state.pt")), weights_only=False)
    assert state["counters"]["env_steps"] == 20
    assert all(torch.isfinite(v).all() for v in state["agent"].values())


def test_non_finite_action_stops_with_one_line_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    real, calls = M.IQL.act, []

    def poisoned(agent, obs, sample):  # a NaN exploration action at online env step 33
        calls.append(sample)
        return real(agent, obs, sample) * (float("nan") if sum(calls) == 33 else 1.0)

    monkeypatch.setattr(M.IQL, "act", poisoned)
    save_path = tmp_path / "mine" / "run.pt"
    with pytest.raises(M.UserError) as err:
        run(tmp_path, online_steps=40, save_path=str(save_path))  # --save-path: the state goes there, not to runs/
    msg = str(err.value)
    assert "\n" not in msg and msg == f"non-finite action at online step 33; stopped, last good state kept at {save_path}"
    assert torch.load(save_path, weights_only=False)["counters"]["env_steps"] == 20
    assert not list((tmp_path / "runs").glob("*/state.pt"))


def test_kill_and_resume_continues_exactly(tmp_path, capsys):
    """SIGKILL a run once its state shows env step >= 40; --resume continues from that state, at most one evaluation
    period (20 steps) of work lost, and ends with the state of an uninterrupted run, bit for bit."""
    flags = dict(HOPPER, **TINY, seed=3, save_every=1)
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    state_path = tmp_path / "killed.pt"
    cmd = [
        sys.executable,
        str(ROOT / "iql.py"),
        *cli,
        "--online-steps=100000",
        f"--save-path={state_path}",
        f"--runs-dir={tmp_path / 'runs'}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, saved = time.time() + 120, 0
    while saved < 40 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if state_path.is_file():
            saved = torch.load(state_path, weights_only=False)["counters"]["env_steps"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved >= 40 and proc.returncode == -signal.SIGKILL, "the run did not save env step 40 before the kill"
    at_kill = torch.load(state_path, weights_only=False)["counters"]["env_steps"]
    assert at_kill >= 40 and at_kill % 20 == 0
    M.main(M.Args(resume=str(state_path), online_steps=100))
    assert f"resumed {state_path} at env step {at_kill}" in capsys.readouterr().out
    straight = run(tmp_path / "straight", seed=3, online_steps=100, save_every=1)
    a, b = (torch.load(p, weights_only=False) for p in (straight["state_path"], state_path))
    assert a["counters"]["env_steps"] == b["counters"]["env_steps"] == 100
    for k, v in a["agent"].items():
        torch.testing.assert_close(b["agent"][k], v, rtol=0, atol=0, msg=k)
    for k, v in a["buffer"]["online"].items():
        np.testing.assert_array_equal(b["buffer"]["online"][k], v)
    assert a["buffer"]["rng"] == b["buffer"]["rng"] and torch.equal(a["torch_rng"], b["torch_rng"])
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]
    for k, v in a["counters"].items():
        np.testing.assert_array_equal(np.asarray(b["counters"][k]), np.asarray(v), err_msg=k)


@pytest.mark.parametrize("task", [HOPPER, DOOR], ids=["hopper", "door"])
def test_end_to_end(tmp_path, task):
    out = M.main(
        M.Args(
            **task,
            hidden_dim=32,
            batch_size=32,
            offline_updates=300,
            online_steps=100,
            eval_every=50,
            eval_episodes=2,
            max_episode_steps=40,
            runs_dir=str(tmp_path),
            save_model=True,
        )
    )
    assert np.isfinite(out["score"]) and out["env_steps"] == 100
    s = scalars(out["run_dir"])
    for tag in (
        "charts/normalized_score",
        "charts/episodic_return",
        "charts/eval_return",
        "charts/env_steps",
        "charts/SPS",
        "charts/grad_updates",
        "losses/qf_loss",
        "losses/vf_loss",
        "losses/actor_loss",
        "losses/adv_mean",
        "losses/q_mean",
        "offline/qf_loss",
    ):
        assert tag in s, tag
    assert sorted(s["charts/normalized_score"]) == [0, 50, 100]  # iteration 0 (after pretraining), then env steps
    assert s["charts/grad_updates"][100] == 400 and all(np.isfinite(v) for v in s["losses/qf_loss"].values())
    actor = torch.load(out["run_dir"] / "iql.pt", weights_only=False)  # --save-model: {exp_name}.pt
    assert actor["args"]["actor_dropout"] == (0.1 if task is DOOR else 0.0)
    for k, v in actor["actor"].items():
        torch.testing.assert_close(v, out["agent"].actor.state_dict()[k], rtol=0, atol=0)


def test_resume_without_budget_flags_keeps_the_runs_budget(tmp_path):
    first = run(tmp_path, online_steps=40, total_env_steps=23)
    assert M.main(M.Args(resume=str(first["state_path"])))["env_steps"] == 23  # its own --total-env-steps 23
    assert M.main(M.Args(resume=str(first["state_path"]), total_env_steps=30))["env_steps"] == 30


def test_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    """A run killed after logging past its last state: the resumed run's TensorBoard shows each step once, with the
    values of an uninterrupted run."""
    real, real_writer, writers = torch.save, M.make_writer, []
    flags = dict(online_steps=40, eval_every=10, max_episode_steps=8)

    def killed_at_30(state, path):  # the run state's torch.save
        if state["counters"]["env_steps"] == 30:
            writers[-1].flush()  # what the killed process had logged after its last state (env step 20)
            raise KeyboardInterrupt
        real(state, path)

    monkeypatch.setattr(M, "make_writer", lambda *a, **kw: writers.append(real_writer(*a, **kw)) or writers[-1])
    monkeypatch.setattr(M.torch, "save", killed_at_30)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "a", **flags)
    monkeypatch.setattr(M.torch, "save", real)
    (state,) = (tmp_path / "a" / "runs").glob("*/state.pt")
    assert torch.load(state, weights_only=False)["counters"]["env_steps"] == 20
    resumed, straight = M.main(M.Args(resume=str(state))), run(tmp_path / "b", **flags)
    for tag in ("charts/normalized_score", "charts/episodic_return", "charts/env_steps", "charts/grad_updates"):
        assert logged(resumed["run_dir"], tag) == logged(straight["run_dir"], tag), tag
    assert [s for s, _ in logged(resumed["run_dir"], "charts/episodic_return")] == [8, 16, 24, 32, 40]


def test_resume_after_pretraining_shows_the_offline_curves_once(tmp_path):
    """The offline phase is logged at update - offline_updates (<= 0), so a run resumed from the state saved right
    after pretraining (env step 0, purge from step 1) keeps its offline curves, each point once, online steps after."""
    flags = dict(offline_updates=200, eval_every=20)
    first = run(tmp_path / "a", **flags, online_steps=0)  # offline only: its state is the one saved after pretraining
    assert torch.load(first["state_path"], weights_only=False)["counters"]["env_steps"] == 0
    resumed = M.main(M.Args(resume=str(first["state_path"]), online_steps=40))
    straight = run(tmp_path / "b", **flags, online_steps=40)
    for tag in ("offline/qf_loss", "offline/actor_loss", "offline/normalized_score", "charts/normalized_score"):
        assert logged(resumed["run_dir"], tag) == logged(straight["run_dir"], tag), tag
    assert [s for s, _ in logged(resumed["run_dir"], "offline/qf_loss")] == [-100, 0]  # updates 100 and 200 of 200
    assert [s for s, _ in logged(resumed["run_dir"], "offline/normalized_score")] == [0]
    assert [s for s, _ in logged(resumed["run_dir"], "charts/normalized_score")] == [0, 20, 40]


@pytest.mark.parametrize(
    "flags,match",
    [
        (dict(actor_lr=-1.0), "--actor-lr must be > 0, got -1.0"),
        (dict(critic_lr=0.0), "--critic-lr must be > 0, got 0.0"),
        (dict(batch_size=0, eval_episodes=0), "--batch-size must be > 0, got 0"),
        (dict(hidden_dim=0), "--hidden-dim must be > 0, got 0"),
        (dict(eval_episodes=0), "--eval-episodes must be > 0, got 0"),
        (dict(max_episode_steps=0), "--max-episode-steps must be > 0, got 0"),
        (dict(online_steps=-1), "--online-steps must be >= 0, got -1"),
        (dict(offline_updates=-5), "--offline-updates must be >= 0, got -5"),
        (dict(expectile=1.5), r"--expectile must be in \[0, 1\], got 1.5"),
        (dict(tau=2.0), r"--tau must be in \[0, 1\], got 2.0"),
        (dict(buffer_size=100, online_steps=10), "--buffer-size must be > the .* offline transitions, got 100"),
    ],
)
def test_bad_input_is_a_one_line_error_and_nothing_runs(tmp_path, flags, match):
    with pytest.raises(M.UserError, match=f"^{match}$"):
        run(tmp_path, **flags)
    assert not (tmp_path / "runs").exists()


def test_bad_resume_is_a_one_line_error(tmp_path):
    with pytest.raises(M.UserError, match="^--resume '.*nope.pt' does not exist$"):
        M.main(M.Args(resume=str(tmp_path / "nope.pt")))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(M.UserError, match=r"^--resume '.*other.pt' is not a run state of iql.py \(--save-every"):
        M.main(M.Args(resume=str(tmp_path / "other.pt")))
    first = run(tmp_path, online_steps=20)
    with pytest.raises(M.UserError, match=r"only --online-steps, --total-env-steps, --max-seconds may change, not --beta$"):
        M.main(M.Args(resume=str(first["state_path"]), beta=1.0))


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--env-id", "Humanoid-v4"], "error: unknown --env-id 'Humanoid-v4'; supported: Hopper"),
        (["--env-id", "Hopper-v4", "--dataset", "bogus"], "error: unknown --dataset 'bogus'; use one of"),
        (["--critic-lr", "0"], "error: --critic-lr must be > 0, got 0.0"),
    ],
)
def test_bad_input_is_one_line_error(flags, match):
    proc = subprocess.run([sys.executable, str(ROOT / "iql.py"), *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(match) and "Traceback" not in proc.stderr


def test_a_missing_generated_set_is_an_error_not_random_data(tmp_path, monkeypatch):
    """iql.py's copy of the loader: a missing generated/ id other than the random set stops with one line."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    with pytest.raises(M.UserError, match="teacher-noisy-v0.*is not in .* and cannot be downloaded"):
        M.load_dataset("Hopper-v4", "generated/hopper/teacher-noisy-v0", None, 200, 0)
