"""odt_td3.py: relabeling, TD targets, Polyak, the alpha = 0 actor gradient, the loader contract, end to end."""

import copy
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, check_checkpoint_loads

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


def test_relabeled_rtg_is_suffix_sum_times_scale():
    rewards = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
    np.testing.assert_allclose(M.relabel_rtg(rewards, 1e-3), 1e-3 * np.array([2.5, 1.5, 3.5, 0.5]), rtol=1e-6)
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
    flat = M.flatten_buffer(trajs, np.zeros(2), np.ones(2), 0.5, lambda r: r / 100)
    np.testing.assert_allclose(flat["rtg"], 0.5 * np.array([6, 5, 3, 0, 3, 2, 0]))
    np.testing.assert_allclose(flat["rewards"], np.array([1, 2, 3, 0, 1, 2, 0]) / 100, rtol=1e-6)
    assert flat["terminals"].tolist() == [False, False, True, False, False, False, False]  # the 2nd was truncated


def test_td_target_truncation_bootstraps_termination_cuts():
    r, q1, q2 = torch.tensor([1.0, 1.0, 2.0]), torch.tensor([10.0, 10.0, 4.0]), torch.tensor([12.0, 8.0, 5.0])
    term = torch.tensor([False, True, False])  # step 0: time-limit truncation; step 1: true termination
    y = M.td_target(r, term, q1, q2, 0.9)
    torch.testing.assert_close(y, torch.tensor([1 + 0.9 * 10, 1.0, 2 + 0.9 * 4]))


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
    flat = M.flatten_buffer(trajs, np.zeros(2), np.ones(2), 1.0, lambda r: r)
    b = M.sample_segments(flat, K, 64, np.random.default_rng(0), "cpu")
    m = b["mask"]
    torch.testing.assert_close(b["next_states"][m], b["states"][m] + 1)  # s_{t+1}, incl. the final observation
    torch.testing.assert_close(b["next_rtg"][m], b["rtg"][m] - 1)
    last = b["states"][..., 0] == n - 1
    assert last.any() and (b["next_states"][..., 0][last] == n).all()  # bootstraps from the truncation state
    assert not b["terminals"].bool().any()
    # Shifting keeps the left padding: the next window has exactly as many real tokens.
    assert (m.sum(1) >= 1).all() and (b["states"][~m] == 0).all()


def test_twin_min_target_hand_computed():
    torch.manual_seed(0)
    critic = M.TwinCritic(2, 1, hidden=4)
    model = M.DecisionTransformer(2, 1, embed_dim=8, n_layers=1, n_heads=1, dropout=0.0)
    mask = torch.tensor([[False, True]])
    batch = dict(
        states=torch.randn(1, 2, 2),
        actions=torch.rand(1, 2, 1),
        rewards=torch.tensor([[0.0, 3.0]]),
        terminals=torch.tensor([[0, 0]]),
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
        y = 3.0 + 0.99 * min(critic.q1(x).item(), critic.q2(x).item())
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

    def grads(critic, rl_coef):
        model.zero_grad()
        torch.manual_seed(1)  # the same entropy sample for odt
        M.actor_loss(model, critic, batch, algo, rl_coef, torch.tensor(0.1))[0].backward()
        return torch.cat(
            [
                torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()  # log-std head: no
                for p in model.parameters()
            ]
        )  # gradient in the deterministic odt_td3 actor

    c1, c2 = M.TwinCritic(3, 2, hidden=8), M.TwinCritic(3, 2, hidden=8)
    torch.testing.assert_close(grads(c1, 0.0), grads(None, 0.0))
    torch.testing.assert_close(grads(c2, 0.0), grads(None, 0.0))
    if algo == "odt_td3":  # the check has teeth: with alpha > 0 the critic does change it
        assert not torch.allclose(grads(c1, 0.1), grads(None, 0.0))


def test_buffer_seeds_best_and_replaces_worst_first():
    trajs = [dict(rewards=np.full(2, r, np.float32), name=r) for r in (5.0, 1.0, 9.0, 3.0)]
    buf = M.TrajectoryBuffer(trajs, 3)
    assert [t["name"] for t in buf.trajs] == [3.0, 5.0, 9.0]
    for new in ("a", "b", "c", "d"):
        buf.add(dict(rewards=np.zeros(1), name=new))
    assert [t["name"] for t in buf.trajs] == ["d", "b", "c"]  # worst offline first, then oldest first


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
    assert saved["finetune"]["iteration"] == 2 and saved["finetune"]["algo"] == algo
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


def test_bad_input_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "odt_td3.py"), "--algo", "ppo"], capture_output=True, text=True)
    assert out.returncode != 0 and "--algo" in out.stderr and "odt_td3" in out.stderr  # tyro rejects the choice
    with pytest.raises(M.UserError, match="unknown --algo 'ppo'; choose one of odt_td3, odt"):
        M.main(M.Args(algo="ppo", runs_dir=str(tmp_path)))
    with pytest.raises(M.UserError, match="unknown --env-id 'Foo-v0'; supported: MuJoCo"):
        M.main(M.Args(env_id="Foo-v0", runs_dir=str(tmp_path)))


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
    """The first stored observation is the reset observation, not a view of the per-env buffer that later steps
    overwrite (which made every online trajectory's first observation equal its last)."""
    model, ckpt = M.load_model(hopper_checkpoint)
    meta = dict(rtg_scale=ckpt["rtg_scale"], state_mean=ckpt["state_mean"], state_std=ckpt["state_std"])
    envs = [M.make_env("Hopper-v4", max_episode_steps=15) for _ in range(2)]
    trajs = M.rollout(model, envs, [3, 4], meta, target_return=3600.0, context_len=2, act_fn=M.greedy_action, device="cpu")
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
def test_renamed_flags_change_behaviour(hopper_checkpoint, tmp_path, flag, changes):
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
    for k in ("iteration", "env_steps", "grad_updates", "numpy_rng", "buffer_next"):
        assert a["finetune"][k] == b["finetune"][k], k
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
    else:  # a NaN weight right after the state of iteration 1 is saved
        real_save = M.save_state

        def save_then_poison(path, learner, *a, **kw):
            real_save(path, learner, *a, **kw)
            with torch.no_grad():
                learner.model.mean_head.bias.fill_(float("nan"))

        monkeypatch.setattr(M, "save_state", save_then_poison)
    with pytest.raises(M.UserError) as e:
        run(hopper_checkpoint, tmp_path, "Hopper-v4", num_iterations=3, save_every=1, save_path=str(state))
    assert str(e.value) == f"non-finite {what} at iteration 2; stopped, last good state kept at {state}"
    kept = torch.load(state, weights_only=False)
    assert kept["finetune"]["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values())


# ---------------------------------------------------------------- ODT+TD3's reference settings (issue #13)
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
    assert (args.dropout, args.max_grad_norm, args.warmup_updates) == (0.1, 0.25, 0)  # no fresh warm-up
    assert args.eval_context_len == args.c_online


def test_min_steps_per_iter_rolls_out_until_reached(door_checkpoint, tmp_path):
    hist = run(door_checkpoint, tmp_path, "AdroitHandDoor-v1", num_iterations=2, min_steps_per_iter=30)
    assert [h["env_steps"] for h in hist[1:]] == [50, 100]  # two capped 25-step episodes per iteration


def test_finetuning_keeps_dropout_but_targets_and_rollouts_do_not(hopper_checkpoint):
    args = M.apply_presets(M.Args(env_id="Hopper-v4", dataset="local/hopper/medium-v0"))
    model, ckpt = M.load_model(hopper_checkpoint, "cpu", dropout=args.dropout)
    learner = M.Learner(args, model.train(), ckpt, torch.device("cpu"))
    assert not learner.target_model.training and learner.model.blocks[0].dropout == 0.1
    assert learner.scheduler.get_last_lr()[0] == args.learning_rate  # full rate from the first update


def test_training_seeds_are_never_evaluation_seeds(hopper_checkpoint, tmp_path, monkeypatch):
    """Training episodes reset from the run's generator, outside every run seed's `eval_seeds` (--seed 0 used to
    train on its own evaluation episodes: seed + episode)."""
    evaluation = {int(x) for s in range(21) for x in M.eval_seeds(s, 10_000)}
    for s in range(21):
        drawn = M.train_seeds(np.random.default_rng(s), 10_000)
        assert not evaluation & set(drawn.tolist()) and (drawn % 100_000 >= 50_000).all() and (drawn < 2**31).all()
    used, rollout = [], M.rollout

    def record(model, envs, seeds, **kw):
        if kw["act_fn"] is not M.greedy_action:
            used.extend(int(x) for x in seeds)
        return rollout(model, envs, seeds, **kw)

    monkeypatch.setattr(M, "rollout", record)
    for seed in (0, 10):
        run(hopper_checkpoint, tmp_path / str(seed), "Hopper-v4", seed=seed)
    assert len(used) == 4 and not evaluation & set(used)
