"""Tests of grpo_dt_qguided.py: Q-guided advantages, no state resets, the TD target, and tiny end-to-end runs."""

import copy
import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import pytest
import torch
import torch.nn as nn
import tyro
from conftest import check_checkpoint_loads
from gymnasium.envs.mujoco.mujoco_env import MujocoEnv
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import grpo_dt_qguided as qg

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    dataset="local/hopper/medium-v0",
    num_iterations=2,
    n_batch=8,
    group_size=4,
    critic_updates=4,
    critic_warmup_updates=4,
    critic_pretrain_updates=4,
    replay_size=8,
    critic_batch_size=32,
    updates_per_iter=2,
    eval_episodes=1,
    max_episode_steps=30,
    trajs_per_iter=4,
    reset_points=2,
    delta_r=0.0,
)


def tiny_args(ckpt, tmp_path, **overrides):
    env_id = "AdroitHandDoor-v1" if "door" in str(ckpt) else "Hopper-v4"
    base = dict(env_id=env_id, checkpoint=str(ckpt), runs_dir=str(tmp_path / "runs"), **TINY)
    return qg.Args(**{**base, **overrides})


def run_dir(runs_dir) -> Path:
    (run,) = glob.glob(f"{runs_dir}/*/")
    return Path(run)


def events(runs_dir):
    """{tag: [(step, value), ...]} of the single run under runs_dir, every logged event (a step logged twice shows twice)."""
    acc = EventAccumulator(str(run_dir(runs_dir)))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def scalars(runs_dir):
    """{tag: {step: value}} of the single run under runs_dir."""
    return {t: dict(v) for t, v in events(runs_dir).items()}


def next_second():
    """TensorBoard reads a run's event files in name order (seconds, host, pid, then a counter that is not zero-padded):
    a resumed run's writer opened in the same second as the previous one's could sort first and lose steps to the purge."""
    time.sleep(1.01 - time.time() % 1.0)


def load_state(runs_dir):
    return torch.load(run_dir(runs_dir) / "state.pt", weights_only=False)


def random_contexts(model, n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, A = model.embed_state.in_features, model.embed_action.in_features
    mask = torch.ones(n, c, dtype=torch.bool)
    mask[0, : c // 2] = False
    return torch.randn(n, c, 1, generator=g) * 0.1, torch.randn(n, c, S, generator=g), torch.randn(n, c, A, generator=g), mask


def test_checkpoint_loads(hopper_checkpoint):
    ckpt = check_checkpoint_loads(qg.load_model, hopper_checkpoint)
    model, _ = qg.load_model(hopper_checkpoint)
    assert ckpt["model_config"]["dropout"] > 0  # pretrained with dropout, which the loader switches off
    assert all(b.dropout == 0.0 for b in model.blocks) and all(
        m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout)
    )


def test_group_advantages_normalised_and_filtered():
    scores = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)) * 7 + 3
    adv, keep = qg.group_advantages(scores, 0.0)
    torch.testing.assert_close(adv.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv.std(1, correction=0), torch.ones(5), atol=1e-4, rtol=0)
    assert keep.all()
    adv, keep = qg.group_advantages(torch.tensor([[-3.0, -0.5, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0]]), 1.0)
    assert keep.tolist() == [[True, False, False, True], [False, False, False, False]]
    assert torch.isfinite(adv).all() and (adv[1] == 0).all()  # a flat group carries no signal, and no NaN


class PrefersLargerActions(nn.Module):
    """A hand-made critic: Q(s, a) = sum(a) (and a pessimistic twin one below it)."""

    def forward(self, states, actions):
        q = actions.sum(-1) + 0 * states.sum(-1)
        return q + 1.0, q


def test_q_guided_advantages_prefer_what_the_critic_prefers(hopper_checkpoint):
    model, _ = qg.load_model(hopper_checkpoint)
    torch.manual_seed(0)
    ctx = random_contexts(model, 6, 3)
    actions, log_probs, scores = qg.q_guided_scores(model, PrefersLargerActions(), ctx, group_size=8, reward_scale=0.01)
    assert actions.shape == (6, 8, 3) and log_probs.shape == (6, 8)
    torch.testing.assert_close(scores, actions.sum(-1) / 0.01)  # min of the twins, in raw reward units
    adv, _ = qg.group_advantages(scores, 0.0)
    larger = actions.sum(-1) > actions.sum(-1).mean(1, keepdim=True)
    assert (adv[larger] > 0).all() and (adv[~larger] < 0).all()
    best, worst = actions.sum(-1).argmax(1), actions.sum(-1).argmin(1)
    assert (adv.argmax(1) == best).all() and (adv.argmin(1) == worst).all()


def test_ratio_is_one_before_the_update_and_kl_zero_at_reference(hopper_checkpoint):
    model, _ = qg.load_model(hopper_checkpoint)
    ref = copy.deepcopy(model)
    ctx = random_contexts(model, 4, 5)
    actions, old_lp, scores = qg.q_guided_scores(model, PrefersLargerActions(), ctx, 4, 1.0)
    adv, keep = qg.group_advantages(scores, 0.0)
    rows, cols = keep.nonzero(as_tuple=True)
    samples = dict(rtg=ctx[0][rows], states=ctx[1][rows], ctx_actions=ctx[2][rows], mask=ctx[3][rows])
    samples.update(action=actions[rows, cols], old_log_prob=old_lp[rows, cols], advantage=adv[rows, cols])
    idx = torch.as_tensor(np.random.default_rng(0).choice(len(rows), size=16))
    batch = {k: v[idx] for k, v in samples.items()}
    terms = qg.policy_objective(model, ref, batch, clip_coef=0.2)
    torch.testing.assert_close(terms["ratio"], torch.ones(16), atol=1e-5, rtol=0)
    assert terms["clipfrac"].item() == 0.0 and terms["kl"].item() == pytest.approx(0.0, abs=1e-7)
    # After a real step the policy has moved: the ratio leaves 1 and the KL becomes positive.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    terms["policy_loss"].backward()
    opt.step()
    after = qg.policy_objective(model, ref, batch, clip_coef=0.2)
    assert (after["ratio"] - 1).abs().max() > 1e-4 and after["kl"].item() > 0
    # --clip-coef: the same ratios, clipped or not by the coefficient
    tight, wide = (qg.policy_objective(model, ref, batch, clip_coef=c) for c in (1e-6, 1e6))
    torch.testing.assert_close(tight["ratio"], wide["ratio"])
    assert tight["clipfrac"].item() == 1.0 and wide["clipfrac"].item() == 0.0
    assert tight["policy_loss"].item() != wide["policy_loss"].item()


def test_td_target_truncation_bootstraps_termination_cuts(hopper_checkpoint):
    y = qg.td_target(
        torch.tensor([1.0, 1.0]), torch.tensor([True, False]), torch.tensor([10.0, 10.0]), torch.tensor([12.0, 8.0]), gamma=0.9
    )
    torch.testing.assert_close(y, torch.tensor([1.0, 1.0 + 0.9 * 8.0]))
    # The dataset marks only the last step of a terminated episode; a truncated one bootstraps from its final obs.
    model, _ = qg.load_model(hopper_checkpoint)
    S, A = 11, 3

    def traj(T, terminated):
        return {
            "states": np.random.randn(T + 1, S).astype(np.float32),
            "rtg": np.arange(T + 1, dtype=np.float32),
            "actions": np.vstack([np.random.uniform(-1, 1, (T, A)), np.zeros((1, A))]).astype(np.float32),
            "rewards": np.ones(T, np.float32),
            "var": np.ones(T),
            "terminated": terminated,
        }

    trajs = [traj(4, True), traj(3, False)]
    flat = qg.flatten_replay(trajs, reward_scale=0.5, reward_shift=0.0)
    data = qg.critic_batch(flat, np.arange(7), model, 2, device="cpu")
    assert data["term"].tolist() == [False, False, False, True, False, False, False]
    torch.testing.assert_close(data["s2"][-1], torch.as_tensor(trajs[1]["states"][-1]))
    torch.testing.assert_close(data["s"][4], torch.as_tensor(trajs[1]["states"][0]))
    torch.testing.assert_close(data["r"], torch.full((7,), 0.5))
    assert data["a2"].shape == (7, A) and data["a2"].abs().max() < 1
    # the next action: tanh(mean) of the DT on the shifted context, which never reaches into the previous trajectory
    for j, (traj_j, h) in enumerate([(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3)]):
        ctx = [torch.as_tensor(x) for x in qg.contexts(trajs[traj_j], np.array([h]), 2)]
        torch.testing.assert_close(data["a2"][j], torch.tanh(qg.policy_head(model, ctx)[0][0]))


class NoStateResets(gym.Wrapper):
    """Fails on a reset while an episode is still running; counts episodes so the check is never vacuous."""

    resets = 0

    def __init__(self, env):
        super().__init__(env)
        self.running = False

    def reset(self, **kwargs):
        assert not self.running, "env.reset() in the middle of an episode"
        assert not kwargs.get("options"), "reset to a given state"
        NoStateResets.resets += 1
        self.running = True
        return self.env.reset(**kwargs)

    def step(self, action):
        assert self.running, "step before reset"
        out = self.env.step(action)
        self.running = not (out[2] or out[3])
        return out


@pytest.fixture
def forbid_state_resets(monkeypatch):
    """Every way to put a MuJoCo env into a chosen state raises, except the env's own reset()."""
    inside_reset = []
    original_reset, original_set_state = MujocoEnv.reset, MujocoEnv.set_state

    def reset(self, *, seed=None, options=None):  # the signature gymnasium's env checker asks of a reset
        inside_reset.append(True)
        try:
            return original_reset(self, seed=seed, options=options)
        finally:
            inside_reset.pop()

    def set_state(self, *a, **kw):
        if not inside_reset:
            raise AssertionError("set_state outside env.reset()")
        return original_set_state(self, *a, **kw)

    def forbidden(*a, **kw):
        raise AssertionError("state copy / restore called")

    monkeypatch.setattr(MujocoEnv, "reset", reset)
    monkeypatch.setattr(MujocoEnv, "set_state", set_state)
    for name in ("mj_copyData", "mj_setState"):
        monkeypatch.setattr(mujoco, name, forbidden)
    from gymnasium_robotics.envs.adroit_hand.adroit_door import AdroitHandDoorEnv

    monkeypatch.setattr(AdroitHandDoorEnv, "set_env_state", forbidden)
    make_env = qg.make_env
    monkeypatch.setattr(qg, "make_env", lambda *a, **kw: NoStateResets(make_env(*a, **kw)))
    NoStateResets.resets = 0


def check_run(logs, iterations, critic_updates, policy_updates, pretrain_updates=TINY["critic_pretrain_updates"]):
    for tag in ("charts/normalized_score", "charts/eval_return", "charts/env_steps", "charts/grad_updates"):
        assert sorted(logs[tag]) == list(range(iterations + 1)), tag
    for tag in (
        "charts/episodic_return",
        "charts/SPS",
        "losses/critic_loss",
        "losses/q_values",
        "losses/group_score_std",
        "losses/kept_fraction",
        "losses/policy_loss",
        "losses/ratio_mean",
        "losses/clipfrac",
        "losses/kl",
        "losses/entropy",
        "losses/kappa",
    ):
        assert sorted(logs[tag]) == list(range(1, iterations + 1)), tag
        assert all(np.isfinite(v) for v in logs[tag].values()), tag
    steps = [logs["charts/env_steps"][i] for i in range(iterations + 1)]
    assert steps[0] == 0 and all(b > a for a, b in zip(steps, steps[1:]))
    assert logs["charts/grad_updates"][iterations] == pretrain_updates + iterations * (critic_updates + policy_updates)
    assert abs(logs["losses/ratio_mean"][1] - 1) < 0.05 and logs["losses/kappa"][1] == pytest.approx(1e-2, rel=0.05)


def assert_same_state(a, b):
    """Two run states hold bit-identical weights, optimisers, buffers, counters and RNGs."""
    torch.testing.assert_close(b["state_dict"], a["state_dict"], rtol=0, atol=0)
    nets = ("model", "ref_model", "critic", "critic_target", "policy_opt", "critic_opt", "kappa_opt")
    for k in (*nets, "log_kappa", "samples"):
        torch.testing.assert_close(b["finetune"][k], a["finetune"][k], rtol=0, atol=0)
    for k in ("counters", "replay_next"):
        assert b["finetune"][k] == a["finetune"][k], k
    assert b["finetune"]["rng"].bit_generator.state == a["finetune"]["rng"].bit_generator.state
    for ta, tb in zip(a["finetune"]["replay"], b["finetune"]["replay"], strict=True):
        assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert torch.equal(b["finetune"]["torch_rng"], a["finetune"]["torch_rng"])


def test_end_to_end_hopper_never_resets_to_a_state_and_resumes_exactly(hopper_checkpoint, tmp_path, forbid_state_resets):
    straight = tiny_args(hopper_checkpoint, tmp_path / "a", save_every=2)
    qg.main(straight)
    logs = scalars(straight.runs_dir)
    check_run(logs, 2, critic_updates=4, policy_updates=2)
    assert NoStateResets.resets == 5  # 3 evaluations + 2 training episodes, all after the previous episode ended
    # 1 iteration, save, resume to 2 (--num-iterations is a budget flag): the same numbers and weights.
    qg.main(tiny_args(hopper_checkpoint, tmp_path / "b", num_iterations=1, save_every=1))
    state = str(run_dir(tmp_path / "b" / "runs") / "state.pt")
    next_second()
    qg.main(tiny_args(hopper_checkpoint, tmp_path / "b", save_every=1, resume=state))
    resumed_logs = scalars(tmp_path / "b" / "runs")  # the resumed run goes on in its own run directory
    check_run(resumed_logs, 2, critic_updates=4, policy_updates=2)
    for tag in ("charts/normalized_score", "charts/env_steps", "losses/critic_loss", "losses/policy_loss"):
        assert resumed_logs[tag][2] == logs[tag][2], tag
    assert_same_state(load_state(tmp_path / "a" / "runs"), load_state(tmp_path / "b" / "runs"))


def test_end_to_end_door_never_resets_to_a_state(door_checkpoint, tmp_path, forbid_state_resets):
    args = tiny_args(door_checkpoint, tmp_path, dataset="local/door/human-v0", full_trajs_per_iter=2, max_episode_steps=15)
    qg.main(args)
    check_run(scalars(args.runs_dir), 2, critic_updates=4, policy_updates=2)
    assert NoStateResets.resets == 3 + 2 * 2


def test_zero_iterations_only_evaluates(hopper_checkpoint, tmp_path):
    qg.main(tiny_args(hopper_checkpoint, tmp_path, num_iterations=0))
    logs = scalars(tmp_path / "runs")
    assert list(logs["charts/normalized_score"]) == [0] and "losses/critic_loss" not in logs


def test_table6_defaults(hopper_checkpoint, door_checkpoint, tmp_path):
    hop = qg.apply_presets(qg.Args(env_id="Hopper-v4"))
    assert (hop.n_batch, hop.c_online, hop.g_online, hop.clip_coef, hop.delta_r, hop.gamma) == (256, 1, 7200, 0.2, 2.0, 0.99)
    assert (hop.critic_updates, hop.replay_size, hop.critic_pretrain_updates, hop.eval_context_len) == (600, 1000, 10_000, 1)
    assert qg.apply_presets(tyro.cli(qg.Args, args=["--clip-coef", "0.05"])).clip_coef == 0.05
    door = qg.apply_presets(qg.Args(env_id="AdroitHandDoor-v1", dataset="cloned"))
    assert (door.n_batch, door.delta_r, door.full_trajs_per_iter, door.critic_lr) == (512, 0.5, 5, 2e-4)
    hammer = qg.apply_presets(qg.Args(env_id="AdroitHandHammer-v1", dataset="expert"))
    assert (hammer.c_online, hammer.eval_context_len, hammer.delta_r) == (5, 5, 0.8)
    maze = qg.apply_presets(qg.Args(env_id="AntMaze_UMaze-v4", dataset="umaze-diverse"))
    assert (maze.c_online, maze.g_online, maze.gamma, maze.critic_pretrain_updates) == (5, 2, 0.998, 200_000)


BAD_INPUTS = [
    (dict(learning_rate=-1.0), "--learning-rate must be > 0, got -1.0"),
    (dict(n_batch=0), "--n-batch must be > 0, got 0"),
    (dict(eval_episodes=0), "--eval-episodes must be > 0, got 0"),
    (dict(replay_size=0), "--replay-size must be > 0, got 0"),
    (dict(c_online=0), "--c-online must be > 0, got 0"),
    (dict(num_iterations=-1), "--num-iterations must be >= 0, got -1"),
    (dict(critic_updates=-2), "--critic-updates must be >= 0, got -2"),
    (dict(gamma=1.5), "--gamma must be in [0, 1], got 1.5"),
    (dict(group_size=1), "--group-size must be >= 2 (a group of one has no advantage), got 1"),
    (dict(env_id="Pong-v5"), "unknown --env-id 'Pong-v5'"),
    (dict(checkpoint="/no/such.pt"), "--checkpoint '/no/such.pt' does not exist"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS, ids=[m.split()[0] for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_nothing_runs(hopper_checkpoint, tmp_path, flags, message):
    with pytest.raises(qg.UserError) as error:
        qg.main(tiny_args(hopper_checkpoint, tmp_path, **flags))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_bad_checkpoint_and_resume_files_are_one_line(hopper_checkpoint, door_checkpoint, tmp_path):
    with pytest.raises(qg.UserError, match=r"AdroitHandDoor-v1 has dims \(39, 28\), Hopper-v4 has \(11, 3\)$"):
        qg.main(tiny_args(door_checkpoint, tmp_path, env_id="Hopper-v4"))
    with pytest.raises(qg.UserError, match="is not a run state of grpo_dt_qguided.py"):
        qg.main(tiny_args(hopper_checkpoint, tmp_path, resume=str(hopper_checkpoint)))
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(qg.UserError, match="cannot be read by torch.load"):
        qg.main(tiny_args(hopper_checkpoint, tmp_path, resume=str(tmp_path / "broken.pt")))
    ckpt = torch.load(hopper_checkpoint, weights_only=False)  # a checkpoint of a dataset that is not here
    torch.save({**ckpt, "dataset_id": "local/hopper/missing-v0"}, tmp_path / "elsewhere.pt")
    with pytest.raises(qg.UserError, match=r"dataset 'local/hopper/missing-v0' is not under MINARI_DATASETS_PATH$"):
        qg.main(tiny_args(tmp_path / "elsewhere.pt", tmp_path / "elsewhere"))
    # on the command line: one line on stderr, exit status 1
    cmd = [sys.executable, str(ROOT / "grpo_dt_qguided.py"), "--checkpoint", str(hopper_checkpoint), "--n-batch", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1 and out.stderr == "error: --n-batch must be > 0, got 0\n" and not out.stdout


def test_resume_keeps_the_runs_budget_unless_a_budget_flag_is_given(hopper_checkpoint, tmp_path):
    qg.main(tiny_args(hopper_checkpoint, tmp_path, num_iterations=4, total_env_steps=1, save_every=1))
    state = str(run_dir(tmp_path / "runs") / "state.pt")
    assert load_state(tmp_path / "runs")["finetune"]["counters"]["iteration"] == 1  # the env-step budget stopped it
    # no budget flag: the run's own --total-env-steps 1 stops it again after one more iteration (not the default 0)
    next_second()
    qg.main(qg.Args(resume=state))
    assert load_state(tmp_path / "runs")["finetune"]["counters"]["iteration"] == 2
    # a budget flag given anew replaces the run's; the run's --num-iterations 4 still ends it (not the default 200)
    next_second()
    qg.main(qg.Args(resume=state, total_env_steps=10**9))
    assert load_state(tmp_path / "runs")["finetune"]["counters"]["iteration"] == 4
    assert sorted(scalars(tmp_path / "runs")["charts/env_steps"]) == list(range(5))
    # any other flag that differs from the run's is refused
    with pytest.raises(qg.UserError, match="only --num-iterations, --total-env-steps, --max-seconds may change, not --kl-c"):
        qg.main(qg.Args(resume=state, kl_coef=0.5))


def test_resumed_run_logs_every_step_once(hopper_checkpoint, tmp_path, monkeypatch):
    """A state of iteration 1 resumed after the run had logged iteration 2: TensorBoard holds step 2 once, the
    resumed run's, which equals the first one."""
    snapshot, save_atomic = tmp_path / "iteration1.pt", qg.save_atomic

    def keep_iteration_1(path, payload):
        save_atomic(path, payload)
        if payload.get("finetune", {}).get("counters", {}).get("iteration") == 1:
            shutil.copy(path, snapshot)

    monkeypatch.setattr(qg, "save_atomic", keep_iteration_1)
    qg.main(tiny_args(hopper_checkpoint, tmp_path, save_every=1))
    first = scalars(tmp_path / "runs")
    next_second()
    qg.main(tiny_args(hopper_checkpoint, tmp_path, save_every=1, resume=str(snapshot)))
    logged = events(tmp_path / "runs")
    for tag in ("charts/normalized_score", "charts/env_steps", "losses/critic_loss", "losses/policy_loss", "charts/SPS"):
        steps = [step for step, _ in logged[tag]]
        assert steps == sorted(set(steps)) and steps[-1] == 2, tag
    for tag in ("charts/normalized_score", "losses/critic_loss", "losses/policy_loss"):
        assert dict(logged[tag])[2] == first[tag][2], tag


def test_missing_checkpoint_is_pretrained_in_a_subprocess(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the pretraining child: one torch thread is faster on a busy CPU
    extra = "--num-updates 2 --batch-size 4 --embed-dim 8 --n-layers 1 --n-heads 1 --warmup-updates 1 --eval-episodes 1"
    for scale in ("paper", "cpu"):  # --scale picks the default checkpoint and the size pretrain_dt.py makes it
        args = qg.Args(dataset="local/hopper/medium-v0", num_iterations=0, eval_episodes=1, max_episode_steps=10, scale=scale)
        qg.main(dataclasses.replace(args, runs_dir=str(tmp_path / "runs" / scale), pretrain_extra_args=extra))
        path = tmp_path / qg.default_checkpoint_path("Hopper-v4", "local/hopper/medium-v0", 1, scale)
        assert path.is_file() and torch.load(path, weights_only=False)["pretrain_args"]["scale"] == scale
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "Hopper-v4__local-hopper-medium-v0__s1.pt",
        "Hopper-v4__local-hopper-medium-v0__s1__cpu.pt",
    ]
    with pytest.raises(qg.UserError, match="pretraining failed"):
        qg.main(qg.Args(dataset="local/hopper/medium-v0", seed=2, pretrain_extra_args="--no-such-flag"))


def test_iteration_zero_is_the_pretrained_score(hopper_checkpoint, tmp_path):
    """pretrain_dt.py scores at c_online, so its reported score is where finetuning starts."""
    ckpt = torch.load(hopper_checkpoint, weights_only=False)
    score = qg.main(tiny_args(hopper_checkpoint, tmp_path, num_iterations=0, max_episode_steps=None))
    assert score == pytest.approx(ckpt["eval_normalized_score"], abs=1e-6)


def test_default_run_state_and_save_model(hopper_checkpoint, tmp_path):
    """The run state goes to {runs_dir}/{run_name}/state.pt; --save-model adds a checkpoint load_model reads."""
    qg.main(tiny_args(hopper_checkpoint, tmp_path, num_iterations=1, save_model=True))
    state = load_state(tmp_path / "runs")
    assert state["finetune"]["counters"]["iteration"] == 1  # the last iteration is always saved
    assert state["args"] == vars(qg.apply_presets(tiny_args(hopper_checkpoint, tmp_path, num_iterations=1, save_model=True)))
    model, saved = qg.load_model(run_dir(tmp_path / "runs") / "grpo_dt_qguided.pt")
    assert saved["format_version"] == qg.CHECKPOINT_FORMAT_VERSION and not {"finetune", "args"} & set(saved)
    check_checkpoint_loads(qg.load_model, run_dir(tmp_path / "runs") / "grpo_dt_qguided.pt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state["state_dict"][k], rtol=0, atol=0)
    assert not torch.equal(
        state["state_dict"]["mean_head.weight"],
        torch.load(hopper_checkpoint, weights_only=False)["state_dict"]["mean_head.weight"],
    )


def saved_iteration(runs_dir):
    try:
        return load_state(runs_dir)["finetune"]["counters"]["iteration"]
    except (ValueError, FileNotFoundError, EOFError, RuntimeError):  # no run directory or state yet
        return -1


def test_killed_run_resumes_exactly(hopper_checkpoint, tmp_path):
    """SIGKILL a run once its state shows iteration >= 2; --resume it and finish bit-exactly as an uninterrupted run."""
    n, runs = 8, tmp_path / "killed" / "runs"
    flags = {**TINY, "num_iterations": n, "save_every": 1, "runs_dir": runs}
    cmd = [sys.executable, str(ROOT / "grpo_dt_qguided.py"), "--checkpoint", str(hopper_checkpoint)]
    cmd += [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while saved_iteration(runs) < 2:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = saved_iteration(runs)
    assert 2 <= killed_at < n
    next_second()
    qg.main(qg.Args(resume=str(run_dir(runs) / "state.pt")))
    resumed_logs = events(runs)
    qg.main(tiny_args(hopper_checkpoint, tmp_path / "straight", num_iterations=n, save_every=n))
    straight_logs = scalars(tmp_path / "straight" / "runs")
    for tag in ("charts/normalized_score", "charts/env_steps", "losses/critic_loss", "losses/policy_loss", "losses/kappa"):
        steps = [step for step, _ in resumed_logs[tag]]
        assert steps == sorted(set(steps)) and set(range(killed_at + 1, n + 1)) <= set(steps), tag  # each step once
        assert dict(resumed_logs[tag])[n] == straight_logs[tag][n], tag
    assert_same_state(load_state(tmp_path / "straight" / "runs"), load_state(runs))


def test_non_finite_stops_and_keeps_the_last_good_state(hopper_checkpoint, tmp_path, monkeypatch):
    calls = []
    critic_batch = qg.critic_batch

    def nan_in_iteration_2(flat, idx, model, *args, **kwargs):
        calls.append(1)  # critic pretraining's 4 updates, then iteration 1's 4
        if len(calls) == 2 * 4 + 1:
            with torch.no_grad():
                model.mean_head.weight[0, 0] = float("nan")
        return critic_batch(flat, idx, model, *args, **kwargs)

    monkeypatch.setattr(qg, "critic_batch", nan_in_iteration_2)
    with pytest.raises(qg.UserError) as error:
        qg.main(tiny_args(hopper_checkpoint, tmp_path, num_iterations=3, save_every=1))
    state = run_dir(tmp_path / "runs") / "state.pt"
    assert str(error.value) == f"non-finite critic loss at iteration 2; stopped, last good state kept at {state}"
    saved = torch.load(state, weights_only=False)
    assert saved["finetune"]["counters"]["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    # a NaN weight in the checkpoint: the first evaluation's actions are caught, nothing is written
    ckpt = torch.load(hopper_checkpoint, weights_only=False)
    ckpt["state_dict"]["mean_head.bias"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(qg.UserError, match=r"^non-finite action at iteration 0; stopped, no state saved yet$"):
        qg.main(tiny_args(tmp_path / "nan.pt", tmp_path / "nan"))
    assert not list((tmp_path / "nan").rglob("state.pt"))


def test_delta_r_q_is_scale_free_and_the_paper_filter_is_one_flag_away():
    """Q scores of a group differ by far less than Table 6's raw-return Delta_r (2.0 on Hopper): the paper's filter
    drops nearly every candidate, the default (in group stds) keeps all but exact ties, at any scale of Q."""
    scores = 300.0 + torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    _, paper = qg.group_advantages(scores, 2.0, delta_r_q=None)
    _, default = qg.group_advantages(scores, 2.0, delta_r_q=qg.Args().delta_r_q)
    _, scaled = qg.group_advantages(scores * 1000, 2.0, delta_r_q=qg.Args().delta_r_q)
    assert paper.float().mean() < 0.05 and default.all() and torch.equal(default, scaled)
    _, one_std = qg.group_advantages(scores, 2.0, delta_r_q=1.0)
    assert 0.1 < one_std.float().mean() < 0.6
    assert tyro.cli(qg.Args, args=["--delta-r-q", "None"]).delta_r_q is None


def same_trajectory(a, b):
    return all(np.array_equal(a[k], b[k]) for k in ("states", "rtg", "actions", "rewards"))


def test_replay_keeps_the_best_offline_trajectories_and_online_ones_replace_the_worst(
    hopper_checkpoint, tmp_path, monkeypatch
):
    ckpt = torch.load(hopper_checkpoint, weights_only=False)
    meta = dict(rtg_scale=ckpt["rtg_scale"], state_mean=ckpt["state_mean"].numpy(), state_std=ckpt["state_std"].numpy())
    offline = sorted(qg.offline_trajectories(ckpt, meta), key=lambda t: float(t["rewards"].sum()))
    saved, save_atomic = [], qg.save_atomic

    def keep_states(path, payload):
        saved.append(copy.deepcopy(payload["finetune"]))
        save_atomic(path, payload)

    monkeypatch.setattr(qg, "save_atomic", keep_states)
    # --replay-size 3, 2 online trajectories per iteration: the best 3 offline ones are kept, the online ones replace the
    # worst offline ones, worst first, and once none is left the oldest online one
    flags = dict(replay_size=3, full_trajs_per_iter=2, save_every=1, critic_pretrain_updates=0)
    qg.main(tiny_args(hopper_checkpoint, tmp_path / "a", **flags))
    (online1, replay1, next1), (online2, replay2, next2) = ((s["trajs"], s["replay"], s["replay_next"]) for s in saved)
    assert len(replay1) == 3 and next1 == 2 and same_trajectory(replay1[2], offline[-1]) and "var" not in replay1[2]
    assert same_trajectory(replay1[0], online1[0]) and same_trajectory(replay1[1], online1[1]) and "var" in replay1[0]
    assert len(replay2) == 3 and next2 == 1 and len(online2) == 4
    assert [[same_trajectory(t, o) for o in online2] for t in replay2] == [[0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]]
    # a replay with one free slot: the first online trajectory fills it, the next ones replace the worst offline ones
    saved.clear()
    flags = dict(replay_size=len(offline) + 1, full_trajs_per_iter=2, save_every=2, critic_pretrain_updates=0)
    qg.main(tiny_args(hopper_checkpoint, tmp_path / "b", **flags))
    online, replay, replay_next = saved[-1]["trajs"], saved[-1]["replay"], saved[-1]["replay_next"]
    assert len(online) == 4 and len(replay) == len(offline) + 1 and replay_next == 3
    for slot, j in ((-1, 0), (0, 1), (1, 2), (2, 3)):
        assert same_trajectory(replay[slot], online[j]), slot
    for ours, theirs in zip(replay[3:-1], offline[3:], strict=True):
        assert same_trajectory(ours, theirs)
    t = offline[-1]  # the rollouts' layout: T+1 states, RTG tokens from the achieved return down to 0, last action 0
    T = len(t["rewards"])
    assert t["states"].shape[0] == t["actions"].shape[0] == len(t["rtg"]) == T + 1 and not t["actions"][-1].any()
    assert t["rtg"][0] == pytest.approx(t["rewards"].sum() * ckpt["rtg_scale"], rel=1e-5) and t["rtg"][-1] == 0


def test_replay_from_a_d4rl_hdf5_file_equals_the_minari_one(hopper_checkpoint, tmp_path):
    """A checkpoint pretrained with --dataset-path seeds the critic's replay from that file, in the same layout."""
    import h5py
    import minari

    ckpt = torch.load(hopper_checkpoint, weights_only=False)
    episodes = list(minari.load_dataset(ckpt["dataset_id"]).iterate_episodes())
    with h5py.File(tmp_path / "hopper.hdf5", "w") as f:  # D4RL's layout: steps back to back, episode ends flagged
        f["observations"] = np.concatenate([ep.observations[:-1] for ep in episodes])
        f["next_observations"] = np.concatenate([ep.observations[1:] for ep in episodes])
        for key, field in (("actions", "actions"), ("rewards", "rewards"), ("terminals", "terminations")):
            f[key] = np.concatenate([getattr(ep, field) for ep in episodes])
        f["timeouts"] = np.concatenate([ep.truncations for ep in episodes])
        f.create_group("infos")["qpos"] = np.zeros(len(f["rewards"]))  # groups are not read
    meta = dict(rtg_scale=ckpt["rtg_scale"], state_mean=ckpt["state_mean"].numpy(), state_std=ckpt["state_std"].numpy())
    from_minari = qg.offline_trajectories(ckpt, meta)
    from_file = qg.offline_trajectories({**ckpt, "pretrain_args": {"dataset_path": str(tmp_path / "hopper.hdf5")}}, meta)
    assert len(from_file) == len(from_minari) == len(episodes)
    assert any(t["terminated"] for t in from_file)
    for a, b in zip(from_file, from_minari, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pretrain_updates", [200, 0])
def test_critic_is_pretrained_before_iteration_1(hopper_checkpoint, tmp_path, monkeypatch, pretrain_updates):
    """With --critic-pretrain-updates the critic has learnt from the offline replay before the first rollout of
    iteration 1 (its Q on offline transitions moved); with 0 it is still the fresh critic there."""
    runs, fresh, at_iteration_1 = [], [], []
    run_episodes = qg.run_episodes

    class KeptRun(qg.Run):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            runs.append(self)
            fresh.append(copy.deepcopy(self.critic))

    def snapshot_at_iteration_1(model, envs, seeds, meta, **kw):
        if not kw["deterministic"] and not at_iteration_1:
            at_iteration_1.append(copy.deepcopy(runs[0].critic))
        return run_episodes(model, envs, seeds, meta, **kw)

    monkeypatch.setattr(qg, "Run", KeptRun)
    monkeypatch.setattr(qg, "run_episodes", snapshot_at_iteration_1)
    qg.main(tiny_args(hopper_checkpoint, tmp_path, num_iterations=1, critic_pretrain_updates=pretrain_updates))
    flat = qg.flatten_replay(runs[0].replay[1:], reward_scale=1.0, reward_shift=0.0)  # offline transitions
    s, a = (torch.as_tensor(flat[k][flat["row"]]) for k in ("states", "actions"))
    with torch.no_grad():
        q_fresh, q_pretrained = (torch.min(*critic(s, a)).mean().item() for critic in (fresh[0], at_iteration_1[0]))
    logs = scalars(tmp_path / "runs")
    if pretrain_updates:
        assert q_pretrained > q_fresh + 0.5  # rewards of about 3 per step: Q has moved towards them
        assert sorted(logs["pretrain/critic_loss"]) == [0, 100] and logs["charts/grad_updates"][1] >= 200
        assert logs["pretrain/q_values"][100] != logs["pretrain/q_values"][0]
    else:
        assert q_pretrained == q_fresh and "pretrain/critic_loss" not in logs
        assert len(runs[0].replay) == 8  # the replay is seeded all the same


def test_training_seeds_are_never_evaluation_seeds(hopper_checkpoint, tmp_path, monkeypatch):
    evaluation = {int(x) for s in range(21) for x in qg.eval_seeds(s, 10_000)}
    for s in range(21):
        drawn = qg.train_seeds(np.random.default_rng(s), 10_000)
        assert not evaluation & set(drawn.tolist()) and (drawn % 100_000 >= 50_000).all() and (drawn < 2**31).all()
    used, run_episodes = [], qg.run_episodes

    def record(model, envs, seeds, meta, **kw):
        if not kw["deterministic"]:
            used.extend(int(x) for x in seeds)
        return run_episodes(model, envs, seeds, meta, **kw)

    monkeypatch.setattr(qg, "run_episodes", record)
    for seed in (0, 10):
        qg.main(tiny_args(hopper_checkpoint, tmp_path / str(seed), seed=seed, critic_pretrain_updates=0))
    assert len(used) == 4 and not evaluation & set(used)


def test_censor_bound_scores_on_bound_actions_as_the_rollout_did(hopper_checkpoint):
    """A checkpoint pretrained with --censor-bound scores an on-bound action as a point mass in the old log-prob and in
    the ratio alike (ratio 1 at the same policy); scoring the new log-prob with the density instead would not."""
    model, _ = qg.load_model(hopper_checkpoint)
    ctx = random_contexts(model, 4, 5)
    mean, log_std = qg.policy_head(model, ctx)
    action = torch.tanh(mean).detach()
    action[:, 0] = 1.0  # on the bound
    batch = dict(rtg=ctx[0], states=ctx[1], ctx_actions=ctx[2], mask=ctx[3], action=action, advantage=torch.ones(4))
    batch["old_log_prob"] = qg.action_log_prob(mean, log_std, action, 1e-6, censor_bound=0.99).detach()
    censored = qg.policy_objective(model, model, batch, clip_coef=0.2, censor_bound=0.99)
    torch.testing.assert_close(censored["ratio"], torch.ones(4), atol=1e-5, rtol=0)
    density = qg.policy_objective(model, model, batch, clip_coef=0.2)
    assert (density["ratio"] - 1).abs().min() > 1e-3
