"""odt_td3.py: relabeling, TD targets, Polyak, the alpha = 0 actor gradient, the loader contract, end to end."""

import copy
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, check_checkpoint_loads
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import odt_td3 as M

TINY = dict(
    actor_updates=3,
    critic_updates=3,
    n_batch=8,
    critic_pretrain_updates=3,
    eval_episodes=1,
    max_episode_steps=25,
    replay_size=40,
    min_steps_per_iter=0,
    num_iterations=2,
)


_offline = {}


@pytest.fixture(autouse=True)
def offline_data_loaded_once(monkeypatch):
    """Reading the Minari episodes takes seconds; every run of a dataset after the first reuses them."""
    real = M.load_offline_trajectories

    def cached(ckpt):
        key = (ckpt.get("dataset_id"), repr(ckpt.get("pretrain_args")))
        if key not in _offline:
            _offline[key] = real(ckpt)
        return list(_offline[key])

    monkeypatch.setattr(M, "load_offline_trajectories", cached)


def run(ckpt, tmp_path, env_id, **kw):
    dataset = "local/hopper/medium-v0" if env_id.startswith("Hopper") else "local/door/human-v0"
    args = M.Args(env_id=env_id, dataset=dataset, checkpoint=str(ckpt), runs_dir=str(tmp_path / "runs"), **{**TINY, **kw})
    return M.main(args)


def test_loader_contract(hopper_checkpoint):
    ckpt = check_checkpoint_loads(M.load_model, hopper_checkpoint)
    assert ckpt["model_config"]["c_offline"] == 20


def ckpt_of(env_id, rtg_scale):  # what flatten_buffer reads of a checkpoint, for 2-dim states
    return dict(env_id=env_id, rtg_scale=rtg_scale, state_mean=torch.zeros(2), state_std=torch.ones(2))


def test_relabeled_rtg_is_suffix_sum_times_scale():
    rewards = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
    one = dict(observations=np.zeros((5, 2), np.float32), actions=np.zeros((4, 1), np.float32), rewards=rewards)
    flat = M.flatten_buffer([one | dict(terminated=True)], ckpt_of("Hopper-v4", 1e-3))
    np.testing.assert_allclose(flat["rtg"], 1e-3 * np.array([2.5, 1.5, 3.5, 0.5, 0]), rtol=1e-6)
    np.testing.assert_array_equal(flat["rewards"][:4], rewards)  # MuJoCo: the critic sees the raw reward
    # The buffer's RTG tokens are the achieved returns, whatever RTG the rollout was conditioned on.
    trajs = [
        dict(
            observations=np.zeros((n + 1, 2), np.float32),
            actions=np.zeros((n, 1), np.float32),
            rewards=np.arange(1, n + 1, dtype=np.float32),
            terminated=n == 3,
        )
        for n in (3, 2)
    ]
    flat = M.flatten_buffer(trajs, ckpt_of("AdroitHandDoor-v1", 0.5))  # Adroit door: rewards / 100
    np.testing.assert_allclose(flat["rtg"], 0.5 * np.array([6, 5, 3, 0, 3, 2, 0]))
    np.testing.assert_allclose(flat["rewards"], np.array([1, 2, 3, 0, 1, 2, 0]) / 100, rtol=1e-6)
    assert flat["terminals"].tolist() == [False, False, True, False, False, False, False]  # the 2nd was truncated
    antmaze = M.flatten_buffer(trajs, ckpt_of("AntMaze_UMaze-v4", 0.5))
    np.testing.assert_allclose(antmaze["rewards"], [0, 1, 2, 0, 0, 1, 0])  # AntMaze: -1 per step; closing rows are 0


def test_sampled_next_context_is_the_shifted_context():
    n, K = 6, 3
    obs = np.arange(n + 1, dtype=np.float32)[:, None].repeat(2, 1)
    trajs = [
        dict(
            observations=obs,
            actions=np.arange(n, dtype=np.float32)[:, None] / 10,
            rewards=np.ones(n, np.float32),
            terminated=False,
        )
    ]
    flat = M.flatten_buffer(trajs, ckpt_of("Hopper-v4", 1.0))
    b = M.sample_segments(flat, K, 64, np.random.default_rng(0), "cpu")
    m = b["mask"]
    torch.testing.assert_close(b["next_states"][m], b["states"][m] + 1)  # s_{t+1}, incl. the final observation
    torch.testing.assert_close(b["next_rtg"][m], b["rtg"][m] - 1)
    last = b["states"][..., 0] == n - 1
    assert last.any() and (b["next_states"][..., 0][last] == n).all()  # bootstraps from the truncation state
    assert not b["terminals"].bool().any()
    # Shifting keeps the left padding: the next window has exactly as many real tokens.
    assert (m.sum(1) >= 1).all() and (b["states"][~m] == 0).all()


@pytest.mark.parametrize("terminal", [0, 1])  # 0: a time-limit truncation bootstraps; 1: a true termination cuts
def test_twin_min_target_hand_computed(terminal):
    torch.manual_seed(0)
    critic = M.TwinCritic(2, 1, hidden=4)
    model = M.DecisionTransformer(2, 1, embed_dim=8, n_layers=1, n_heads=1, dropout=0.0)
    mask = torch.tensor([[False, True]])
    batch = dict(
        states=torch.randn(1, 2, 2),
        actions=torch.rand(1, 2, 1),
        rewards=torch.tensor([[0.0, 3.0]]),
        terminals=torch.tensor([[0, terminal]]),
        next_states=torch.randn(1, 2, 2),
        next_actions=torch.rand(1, 2, 1),
        next_rtg=torch.randn(1, 2, 1),
        mask=mask,
    )
    # Zero smoothing noise makes the target exact: y = r + gamma * min(Q1', Q2')(s', tanh(mean'(next context))).
    loss, q = M.critic_loss(critic, critic, model, batch, 0.99, policy_noise=0.0, noise_clip=0.5)
    with torch.no_grad():
        a = torch.tanh(model(batch["next_rtg"], batch["next_states"], batch["next_actions"], mask)[0])[0, 1]
        x = torch.cat([batch["next_states"][0, 1], a])
        y = 3.0 + 0.99 * (1 - terminal) * min(critic.q1(x).item(), critic.q2(x).item())
        xs = torch.cat([batch["states"][0, 1], batch["actions"][0, 1]])
        expected = (critic.q1(xs).item() - y) ** 2 + (critic.q2(xs).item() - y) ** 2  # the padded token is ignored
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert q.item() == pytest.approx(critic.q1(xs).item(), rel=1e-5)


def test_polyak_moves_target_by_tau():
    src, tgt = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = copy.deepcopy(tgt)
    M.polyak_update(tgt, src, 0.005)
    for b, t, s in zip(before.parameters(), tgt.parameters(), src.parameters()):
        torch.testing.assert_close(t - b, 0.005 * (s - b))


@pytest.mark.parametrize("algo", ["odt_td3", "odt"])
def test_alpha_zero_critic_does_not_change_actor_gradient(algo):
    torch.manual_seed(0)
    model = M.DecisionTransformer(3, 2, embed_dim=8, n_layers=1, n_heads=1, dropout=0.0)
    batch = dict(
        rtg=torch.randn(4, 5, 1),
        states=torch.randn(4, 5, 3),
        actions=torch.rand(4, 5, 2) * 2 - 1,
        mask=torch.ones(4, 5, dtype=torch.bool),
    )

    def flat_grads():  # the log-std head gets no gradient in the deterministic odt_td3 actor
        return torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in model.parameters()])

    def grads(critic, rl_coef):
        model.zero_grad()
        torch.manual_seed(1)  # the same entropy sample for odt
        M.actor_loss(model, critic, batch, algo, rl_coef, torch.tensor(0.1), 1e-6, 0.99)[0].backward()
        return flat_grads()

    c1, c2 = M.TwinCritic(3, 2, hidden=8), M.TwinCritic(3, 2, hidden=8)
    torch.testing.assert_close(grads(c1, 0.0), grads(c2, 0.0))
    if algo == "odt_td3":  # alpha = 0 is exactly ODT's supervised MSE; with alpha > 0 the critic does change it
        model.zero_grad()
        mean = model(batch["rtg"], batch["states"], batch["actions"], batch["mask"])[0]
        ((torch.tanh(mean) - batch["actions"]) ** 2).mean().backward()
        torch.testing.assert_close(grads(c1, 0.0), flat_grads())
        assert not torch.allclose(grads(c1, 0.1), grads(c1, 0.0))
    else:  # odt has no critic term at all
        torch.testing.assert_close(grads(c1, 0.1), grads(c2, 0.0))


def test_buffer_seeds_best_and_replaces_worst_first(door_checkpoint, tmp_path, monkeypatch):
    offline = M.load_offline_trajectories(torch.load(door_checkpoint, weights_only=False))
    best = sorted(float(t["rewards"].sum()) for t in offline)[-2:]
    seen, real_save = [], M.save_atomic

    def record(path, payload):
        seen.append([float(t["rewards"].sum()) for t in payload["finetune"]["buffer"]])
        real_save(path, payload)

    monkeypatch.setattr(M, "save_atomic", record)
    hist = run(door_checkpoint, tmp_path, "AdroitHandDoor-v1", replay_size=3, num_iterations=4, save_every=1)
    r = [None] + [h["episodic_return"] for h in hist[1:]]  # one rollout per iteration
    assert len(offline) > 3  # the worst offline trajectory is left out, then the worst kept one goes first
    assert seen == [[r[1], *best], [r[1], r[2], best[1]], [r[1], r[2], r[3]], [r[4], r[2], r[3]]]  # then the oldest


def test_iteration_zero_reproduces_checkpoint_score(hopper_checkpoint, tmp_path):
    ckpt = torch.load(hopper_checkpoint, weights_only=False)
    hist = run(
        hopper_checkpoint, tmp_path, "Hopper-v4", num_iterations=0, max_episode_steps=None, c_online=ckpt["eval_context_len"]
    )
    assert len(hist) == 1 and hist[0]["normalized_score"] == pytest.approx(ckpt["eval_normalized_score"], abs=1e-3)


@pytest.mark.parametrize("env_id", ["Hopper-v4", "AdroitHandDoor-v1"])
@pytest.mark.parametrize("algo", ["odt_td3", "odt"])
def test_end_to_end(hopper_checkpoint, door_checkpoint, tmp_path, env_id, algo):
    ckpt = hopper_checkpoint if env_id.startswith("Hopper") else door_checkpoint
    hist = run(ckpt, tmp_path, env_id, algo=algo, save_every=1, save_path=str(tmp_path / "ft.pt"))
    assert [h["iteration"] for h in hist] == [0, 1, 2]
    assert all(np.isfinite(h["normalized_score"]) for h in hist)
    per_iteration = np.diff([0] + [h["env_steps"] for h in hist[1:]])
    assert ((per_iteration >= 1) & (per_iteration <= 25)).all()  # one rollout per iteration, capped episodes
    keys = {"sup_loss", "critic_loss", "q_values", "rl_loss"} if algo == "odt_td3" else {"sup_loss", "entropy", "nll"}
    assert keys <= set(hist[-1]) and all(np.isfinite(hist[-1][k]) for k in keys)
    saved = torch.load(tmp_path / "ft.pt", weights_only=False)
    assert saved["finetune"]["iteration"] == 2 and saved["args"]["algo"] == algo
    before = torch.load(ckpt, weights_only=False)["state_dict"]
    assert any(not torch.equal(before[k], v) for k, v in saved["state_dict"].items())  # the DT was finetuned
    check_checkpoint_loads(M.load_model, tmp_path / "ft.pt")  # still the shared checkpoint format


def test_resume_continues_exactly(door_checkpoint, tmp_path):
    straight = run(
        door_checkpoint, tmp_path, "AdroitHandDoor-v1", num_iterations=2, save_every=1, save_path=str(tmp_path / "a.pt")
    )
    run(door_checkpoint, tmp_path, "AdroitHandDoor-v1", num_iterations=1, save_every=1, save_path=str(tmp_path / "b.pt"))
    resumed = run(
        door_checkpoint,
        tmp_path,
        "AdroitHandDoor-v1",
        num_iterations=2,
        save_every=1,
        save_path=str(tmp_path / "b.pt"),
        resume=str(tmp_path / "b.pt"),
    )
    assert [h["iteration"] for h in resumed] == [2]
    assert resumed[0]["env_steps"] == straight[-1]["env_steps"]
    a, b = (torch.load(tmp_path / f, weights_only=False)["state_dict"] for f in ("a.pt", "b.pt"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_resume_without_budget_flags_keeps_the_runs_budget(door_checkpoint, tmp_path):
    state = tmp_path / "s.pt"
    run(door_checkpoint, tmp_path, "AdroitHandDoor-v1", num_iterations=2, save_every=1, save_path=str(state))
    assert M.main(M.Args(resume=str(state))) == []  # the run's own --num-iterations 2: nothing left to do
    assert torch.load(state, weights_only=False)["finetune"]["iteration"] == 2
    hist = M.main(M.Args(resume=str(state), num_iterations=3))  # a budget flag given anew extends it
    assert [h["iteration"] for h in hist] == [3]
    with pytest.raises(M.UserError, match="only --num-iterations, --total-env-steps, --max-seconds may change, not --n-batch"):
        M.main(M.Args(resume=str(state), n_batch=4))


def test_resumed_run_logs_each_step_once(door_checkpoint, tmp_path, monkeypatch):
    """A state from iteration 2 of a run that went on to log iteration 3: the resumed run replaces that step."""
    state, real_save = tmp_path / "s.pt", M.save_atomic

    def keep_iteration_2(path, payload):
        real_save(path, payload)
        if payload["finetune"]["iteration"] == 2:
            shutil.copy(path, state)

    monkeypatch.setattr(M, "save_atomic", keep_iteration_2)
    run(door_checkpoint, tmp_path, "AdroitHandDoor-v1", num_iterations=3, save_every=1, save_path=str(tmp_path / "a.pt"))
    monkeypatch.undo()
    M.main(M.Args(resume=str(state), save_path=str(tmp_path / "a.pt")))
    (run_dir,) = (tmp_path / "runs").iterdir()
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    for tag in ("charts/normalized_score", "losses/sup_loss"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert sorted(steps) == sorted(set(steps)) and max(steps) == 3, (tag, steps)


def test_scale_picks_the_default_checkpoint(hopper_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default checkpoints/ folder is relative
    path = M.default_checkpoint_path("Hopper-v4", "local/hopper/medium-v0", 1, scale="cpu")
    path.parent.mkdir()
    shutil.copy(hopper_checkpoint, path)
    args = M.Args(dataset="local/hopper/medium-v0", scale="cpu", runs_dir=str(tmp_path / "runs"), **TINY)
    assert M.ensure_checkpoint(args) == path and path.name.endswith("__cpu.pt")  # found: nothing is pretrained
    assert len(M.main(replace(args, num_iterations=0))) == 1


def test_bad_input_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "odt_td3.py"), "--algo", "ppo"], capture_output=True, text=True)
    assert out.returncode != 0 and "--algo" in out.stderr and "odt_td3" in out.stderr  # tyro rejects the choice
    cmd = [sys.executable, str(ROOT / "odt_td3.py"), "--n-batch", "0", "--runs-dir", str(tmp_path / "runs")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr == "error: --n-batch must be > 0, got 0\n"
    assert not (tmp_path / "runs").exists()  # nothing ran


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(env_id="Foo-v0"), "unknown --env-id 'Foo-v0'; supported: Hopper"),
        (dict(learning_rate=-1.0), "--learning-rate must be > 0, got -1.0"),
        (dict(critic_lr=0.0), "--critic-lr must be > 0, got 0.0"),
        (dict(eval_episodes=0), "--eval-episodes must be > 0, got 0"),
        (dict(replay_size=0), "--replay-size must be > 0, got 0"),
        (dict(c_online=0), "--c-online must be > 0, got 0"),
        (dict(actor_updates=0), "--actor-updates must be > 0, got 0"),
        (dict(num_iterations=-1), "--num-iterations must be >= 0, got -1"),
        (dict(critic_pretrain_updates=-1), "--critic-pretrain-updates must be >= 0, got -1"),
        (dict(total_env_steps=-5), "--total-env-steps must be >= 0, got -5"),
        (dict(rl_coef=-0.1), "--rl-coef must be >= 0, got -0.1"),
        (dict(gamma=1.5), "--gamma must be in [0, 1], got 1.5"),
        (dict(tau=2.0), "--tau must be in [0, 1], got 2.0"),
        (dict(checkpoint="missing.pt"), "--checkpoint 'missing.pt' does not exist"),
        (dict(resume="missing.pt"), "--resume 'missing.pt' does not exist"),
    ],
)
def test_each_bad_input_class_is_one_line_naming_the_flag(tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(M, "seed_everything", lambda args: pytest.fail("a run started"))
    with pytest.raises(M.UserError) as e:
        M.main(M.Args(runs_dir=str(tmp_path / "runs"), **flags))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_checkpoint_of_another_env_is_one_line(door_checkpoint, tmp_path):
    with pytest.raises(M.UserError, match="is for AdroitHandDoor-v1, not --env-id Hopper-v4"):
        run(door_checkpoint, tmp_path, "Hopper-v4")


def test_env_step_budget_stops_after_the_iteration_that_reaches_it(door_checkpoint, tmp_path):
    hist = run(door_checkpoint, tmp_path, "AdroitHandDoor-v1", num_iterations=5, total_env_steps=30)
    assert [h["iteration"] for h in hist] == [0, 1, 2] and [h["env_steps"] for h in hist[1:]] == [25, 50]


def test_d4rl_file_keeps_the_final_observation(tmp_path):
    import h5py

    n = 5
    obs = np.arange(n, dtype=np.float32)[:, None].repeat(11, 1)
    with h5py.File(tmp_path / "d.hdf5", "w") as f:
        f["observations"], f["next_observations"] = obs, obs + 100
        f["actions"], f["rewards"] = np.zeros((n, 3), np.float32), np.ones(n, np.float32)
        f["terminals"], f["timeouts"] = np.array([0, 1, 0, 0, 0], bool), np.array([0, 0, 0, 0, 1], bool)
    trajs = M.load_offline_trajectories({"env_id": "Hopper-v4", "pretrain_args": {"dataset_path": str(tmp_path / "d.hdf5")}})
    assert [len(t["rewards"]) for t in trajs] == [2, 3] and [t["terminated"] for t in trajs] == [True, False]
    assert trajs[1]["observations"][:, 0].tolist() == [2, 3, 4, 104]  # a timeout bootstraps from next_observations


def test_rollout_keeps_each_trajectorys_first_observation(hopper_checkpoint):
    """The first stored observation is the reset observation, not a view of the per-env buffer later steps overwrite."""
    model, ckpt = M.load_model(hopper_checkpoint)
    envs = [M.make_env("Hopper-v4", max_episode_steps=15) for _ in range(2)]
    trajs = M.rollout(model, envs, [3, 4], ckpt=ckpt, target_return=3600.0, context_len=2, mode="eval")
    for traj, seed in zip(trajs, (3, 4)):
        first = M.make_env("Hopper-v4").reset(seed=seed)[0].astype(np.float32)
        np.testing.assert_array_equal(traj["observations"][0], first)
        assert len(traj["observations"]) == len(traj["actions"]) + 1
        assert not np.array_equal(traj["observations"][0], traj["observations"][-1])


# ---------------------------------------------------------------- flags, run state, non-finite guard
_baseline = {}


@pytest.mark.parametrize(
    "flag, changes",
    [
        (dict(n_batch=4), "sup_loss"),  # fewer segments per update
        (dict(c_online=1), "eval_return"),  # the rollout and evaluation context
        (dict(g_online=10.0), "episodic_return"),  # the RTG that conditions training rollouts
        (dict(algo="odt", kappa_lr=1e-1), "temperature"),  # the temperature's dual step size
    ],
)
def test_flags_change_behaviour(hopper_checkpoint, tmp_path, flag, changes):
    algo = flag.get("algo", "odt_td3")
    if algo not in _baseline:
        _baseline[algo] = run(hopper_checkpoint, tmp_path / "base", "Hopper-v4", num_iterations=1, algo=algo)[-1]
    changed = run(hopper_checkpoint, tmp_path, "Hopper-v4", num_iterations=1, **flag)[-1]
    assert changed[changes] != _baseline[algo][changes]


def test_run_state_is_saved_by_default_and_save_model_writes_a_checkpoint(hopper_checkpoint, tmp_path, capsys):
    assert M.Args().save_every == 5 and M.Args().save_path is None
    run(hopper_checkpoint, tmp_path, "Hopper-v4", save_model=True)
    (state,) = (tmp_path / "runs").glob("*/state.pt")
    assert f"run state: {state}" in capsys.readouterr().out
    assert torch.load(state, weights_only=False)["finetune"]["iteration"] == 2  # the last iteration is always saved
    check_checkpoint_loads(M.load_model, state.parent / "odt_td3.pt")
    assert "finetune" not in torch.load(state.parent / "odt_td3.pt", weights_only=False)


def test_killed_run_resumes_bit_exactly(door_checkpoint, tmp_path, capsys):
    n, threads = 8, torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1)
    try:
        args = M.Args(
            env_id="AdroitHandDoor-v1",
            dataset="local/door/human-v0",
            checkpoint=str(door_checkpoint),
            runs_dir=str(tmp_path / "a"),
            save_path=str(tmp_path / "a.pt"),
            **{**TINY, "num_iterations": n, "save_every": 1},
        )
        M.main(args)
        state = tmp_path / "b.pt"
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "num_iterations": n, "save_every": 1}.items()]
        cmd = [
            sys.executable,
            str(ROOT / "odt_td3.py"),
            "--env-id",
            "AdroitHandDoor-v1",
            "--dataset",
            "local/door/human-v0",
            "--checkpoint",
            str(door_checkpoint),
            "--runs-dir",
            str(tmp_path / "b"),
            "--save-path",
            str(state),
            *flags,
        ]
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
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
        hist = M.main(replace(args, resume=str(state), save_path=str(state), runs_dir=str(tmp_path / "b")))
    finally:
        torch.set_num_threads(threads)
    assert hist[0]["iteration"] == saved + 1  # at most the iteration in flight is lost
    a, b = (torch.load(p, weights_only=False) for p in (tmp_path / "a.pt", state))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for k in ("iteration", "env_steps", "grad_updates", "buffer_next"):
        assert a["finetune"][k] == b["finetune"][k], k
    assert a["finetune"]["rng"].bit_generator.state == b["finetune"]["rng"].bit_generator.state
    for k, v in a["finetune"]["critic"].items():
        assert torch.equal(v, b["finetune"]["critic"][k]), k


@pytest.mark.parametrize("what", ["loss", "action"])
def test_non_finite_stops_and_keeps_the_last_good_state(hopper_checkpoint, tmp_path, monkeypatch, what):
    state = tmp_path / "state.pt"
    if what == "loss":  # the critic loss turns NaN in iteration 2 (3 pretraining + 3 updates per iteration)
        calls, real = [], M.critic_loss

        def nan_loss(*a, **kw):
            calls.append(1)
            loss, q = real(*a, **kw)
            return (loss * float("nan") if len(calls) > 6 else loss), q

        monkeypatch.setattr(M, "critic_loss", nan_loss)
    else:  # a NaN weight after the state of iteration 1 is saved, before the rollout of iteration 2
        calls, real = [], M.rollout

        def poison_second_training_rollout(model, *a, **kw):
            calls.extend(["check" in kw])  # training rollouts are checked, evaluation ones are not
            if sum(calls) == 2 and calls[-1]:
                with torch.no_grad():
                    model.mean_head.bias.fill_(float("nan"))
            return real(model, *a, **kw)

        monkeypatch.setattr(M, "rollout", poison_second_training_rollout)
    with pytest.raises(M.UserError) as e:
        run(hopper_checkpoint, tmp_path, "Hopper-v4", num_iterations=3, save_every=1, save_path=str(state))
    assert str(e.value) == f"non-finite {what} at iteration 2; stopped, last good state kept at {state}"
    kept = torch.load(state, weights_only=False)
    assert kept["finetune"]["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values())


# ---------------------------------------------------------------- ODT+TD3's reference settings
@pytest.mark.parametrize(
    "env_id, dataset, expected",
    [
        ("Hopper-v4", "medium", dict(c_online=5, replay_size=1000, min_steps_per_iter=0, weight_decay=5e-4)),
        ("Hopper-v4", "random", dict(min_steps_per_iter=1000)),
        ("Walker2d-v4", "medium", dict(weight_decay=1e-3)),
        ("AdroitHandDoor-v1", "human", dict(c_online=1, replay_size=5000, min_steps_per_iter=1000, weight_decay=1e-4)),
        ("AdroitHandHammer-v1", "human", dict(c_online=1)),
        ("AdroitHandPen-v1", "human", dict(c_online=5)),
        ("AntMaze_UMaze-v4", "umaze", dict(c_online=1, replay_size=2000, min_steps_per_iter=1000, gamma=0.998)),
    ],
)
def test_presets_follow_odt_td3(env_id, dataset, expected):
    args = M.apply_presets(M.Args(env_id=env_id, dataset=dataset))
    assert {k: getattr(args, k) for k in expected} == expected
    assert (args.dropout, args.max_grad_norm) == (0.1, 0.25)
    assert args.eval_context_len == args.c_online


def test_min_steps_per_iter_rolls_out_until_reached(door_checkpoint, tmp_path):
    hist = run(door_checkpoint, tmp_path, "AdroitHandDoor-v1", num_iterations=2, min_steps_per_iter=30)
    assert [h["env_steps"] for h in hist[1:]] == [50, 100]  # two capped 25-step episodes per iteration


def test_finetuning_keeps_dropout_but_targets_and_rollouts_do_not(hopper_checkpoint):
    args = M.apply_presets(M.Args(env_id="Hopper-v4", dataset="local/hopper/medium-v0"))
    model, ckpt = M.load_model(hopper_checkpoint, "cpu", dropout=args.dropout)
    learner = M.make_learner(args, model.train(), ckpt, torch.device("cpu"))
    assert not learner["target_model"].training and learner["model"].blocks[0].dropout == 0.1
    assert learner["optimizer"].param_groups[0]["lr"] == args.learning_rate  # full rate from the first update: no warm-up


def test_training_seeds_are_never_evaluation_seeds(hopper_checkpoint, tmp_path, monkeypatch):
    """Training episodes reset from the run's generator, outside every run seed's `eval_seeds`."""
    evaluation = {int(x) for s in range(21) for x in M.eval_seeds(s, 10_000)}
    for s in range(21):
        drawn = M.train_seeds(np.random.default_rng(s), 10_000)
        assert not evaluation & set(drawn.tolist()) and (drawn % 100_000 >= 50_000).all() and (drawn < 2**31).all()
    used, rollout = [], M.rollout

    def record(model, envs, seeds, **kw):
        if kw["mode"] != "eval":
            used.extend(int(x) for x in seeds)
        return rollout(model, envs, seeds, **kw)

    monkeypatch.setattr(M, "rollout", record)
    for seed in (0, 10):
        run(hopper_checkpoint, tmp_path / str(seed), "Hopper-v4", seed=seed)
    assert len(used) == 4 and not evaluation & set(used)
