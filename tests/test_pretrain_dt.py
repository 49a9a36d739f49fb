"""pretrain_dt.py: dataset resolution, the squashed Gaussian, the dual temperature, LAMB, padding, determinism,
one-line errors, checkpoints written only when complete, and an end-to-end run whose checkpoint loads back."""

import math
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import tyro
from conftest import TINY_MODEL, check_checkpoint_loads, tiny_pretrain_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributions import Normal

import pretrain_dt as pt

pytestmark = pytest.mark.filterwarnings("ignore:.* is set to None:UserWarning")  # minari's metadata requests


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    """An empty Minari datasets root, so tests build their own tiny datasets."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    return tmp_path / "datasets"


def tiny_minari_dataset(dataset_id, steps=120):
    return pt.generate_random_dataset(dataset_id, "Hopper-v4", "hopper", steps, seed=0)


# ---------------------------------------------------------------- datasets
def test_short_name_maps_to_minari_id_found_locally(minari_root):
    tiny_minari_dataset("mujoco/hopper/medium-v0")
    dataset_id, trajs, ref_min, ref_max = pt.load_dataset("Hopper-v4", "medium", None, 0, 0)
    assert dataset_id == "mujoco/hopper/medium-v0"
    assert sum(len(t["rewards"]) for t in trajs) == 120
    assert (ref_min, ref_max) == pt.D4RL_REF["hopper"]
    t = trajs[0]
    assert t["observations"].shape == (len(t["rewards"]), 11) and t["actions"].shape == (len(t["rewards"]), 3)


def test_any_minari_id(minari_root):
    tiny_minari_dataset("mine/hopper/tiny-v0", steps=50)
    dataset_id, trajs, _, _ = pt.load_dataset("Hopper-v5", "mine/hopper/tiny-v0", None, 0, 0)
    assert dataset_id == "mine/hopper/tiny-v0" and sum(len(t["rewards"]) for t in trajs) == 50


def test_a_minari_set_scores_with_its_own_reference_scores(minari_root):
    """A Minari set's ref_min/ref_max come from its metadata, not from the D4RL table; every episode is loaded."""
    import minari
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    buffers = [
        EpisodeBuffer(
            observations=rng.normal(size=(n + 1, 11)),
            actions=rng.uniform(-1, 1, size=(n, 3)),
            rewards=[1.0] * n,
            terminations=[False] * n,
            truncations=[False] * (n - 1) + [True],
            infos={},
        )
        for n in (5, 7, 9)
    ]
    minari.create_dataset_from_buffers("mine/hopper/ref-v0", buffers, env="Hopper-v4", ref_min_score=-5.0, ref_max_score=45.0)
    dataset_id, trajs, ref_min, ref_max = pt.load_dataset("Hopper-v4", "mine/hopper/ref-v0", None, 0, 0)
    assert [len(t["rewards"]) for t in trajs] == [5, 7, 9] and (ref_min, ref_max) == (-5.0, 45.0)
    assert pt.normalized_score(np.mean([t["rewards"].sum() for t in trajs]), ref_min, ref_max) == pytest.approx(24.0)


def test_the_tests_hopper_set_loads_whole():
    dataset_id, trajs, ref_min, ref_max = pt.load_dataset("Hopper-v4", "local/hopper/medium-v0", None, 0, 0)
    assert len(trajs) == 24 and (ref_min, ref_max) == pt.D4RL_REF["hopper"]  # tests/conftest.py's TINY_DATASETS


def test_normalized_score_is_minaris_times_100():
    """The checkpoint carries the reference scores so D4RL files score too; for Minari sets it must agree with
    `minari.get_normalized_score`."""
    import minari

    _, _, ref_min, ref_max = pt.load_dataset("Hopper-v4", "local/hopper/medium-v0", None, 0, 0)
    returns = np.array([-20.0, 0.0, 1290.0, 3600.0])
    expected = 100 * minari.get_normalized_score(minari.load_dataset("local/hopper/medium-v0"), returns)
    np.testing.assert_allclose(pt.normalized_score(returns, ref_min, ref_max), expected, rtol=1e-12)


def test_d4rl_hdf5_file(tmp_path):
    n = 30
    rng = np.random.default_rng(0)
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[9], timeouts[19] = True, True  # episodes [0,10) [10,20) and an unfinished [20,30)
    path = tmp_path / "hopper-medium-v2.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, 11))
        f["actions"] = rng.uniform(-1, 1, size=(n, 3))
        f["rewards"] = np.arange(n, dtype=np.float64)
        f["terminals"], f["timeouts"] = terminals, timeouts
    dataset_id, trajs, ref_min, ref_max = pt.load_dataset("Hopper-v4", "medium", str(path), 0, 0)
    assert dataset_id == "d4rl/hopper-medium-v2"
    assert [len(t["rewards"]) for t in trajs] == [10, 10, 10]
    assert trajs[0]["terminals"][-1] and not trajs[1]["terminals"].any()
    np.testing.assert_array_equal(trajs[2]["rewards"], np.arange(20, 30))
    assert (ref_min, ref_max) == pt.D4RL_REF["hopper"]


@pytest.mark.parametrize("content", ["missing keys", "not hdf5"])
def test_a_bad_d4rl_file_is_one_line(tmp_path, content):
    path = tmp_path / "bad.hdf5"
    if content == "missing keys":
        with h5py.File(path, "w") as f:
            f["observations"] = np.zeros((3, 11))
    else:
        path.write_text("observations,actions\n")
    with pytest.raises(pt.UserError, match="--dataset-path .*bad.hdf5.* is not a D4RL HDF5 file with keys") as err:
        pt.load_dataset("Hopper-v4", "medium", str(path), 0, 0)
    assert "\n" not in str(err.value)


def test_random_is_generated_as_a_minari_dataset(minari_root):
    dataset_id, trajs, ref_min, ref_max = pt.load_dataset("Hopper-v4", "random", None, 200, 0)
    assert dataset_id == "generated/hopper/random-v0"
    assert sum(len(t["rewards"]) for t in trajs) == 200
    import minari

    assert "generated/hopper/random-v0" in minari.list_local_datasets()  # loads like any other set
    assert (ref_min, ref_max) == pt.D4RL_REF["hopper"]


def test_a_missing_generated_set_is_an_error_not_random_data(minari_root):
    """Only `generated/<env>/random-v0` is made here; any other missing generated/ id (e.g. a set of
    benchmarks/make_datasets.py not yet made) must stop, not silently become a uniform-random dataset."""
    with pytest.raises(pt.UserError, match="teacher-noisy-v0.* is not in .* and cannot be downloaded"):
        pt.load_dataset("Hopper-v4", "generated/hopper/teacher-noisy-v0", None, 200, 0)
    import minari

    assert "generated/hopper/teacher-noisy-v0" not in minari.list_local_datasets()


@pytest.mark.parametrize(
    "env_id,dataset,match",
    [
        ("Hopper-v4", "medium-replay", "--dataset-path"),
        ("Hopper-v4", "bogus", "expert.*medium.*random"),
        ("AdroitHandDoor-v1", "medium", "cloned.*expert.*human"),
        ("Humanoid-v4", "medium", "supported: Hopper/Walker2d"),
    ],
)
def test_bad_input_is_one_clear_error(minari_root, env_id, dataset, match):
    with pytest.raises(pt.UserError, match=match):
        pt.load_dataset(env_id, dataset, None, 0, 0)


def test_unreachable_remote_fails_within_5s(minari_root, monkeypatch):
    def black_hole(*args, **kwargs):  # a network where DNS and connects hang
        time.sleep(30)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", black_hole)
    tiny_minari_dataset("mine/hopper/tiny-v0", steps=20)
    start = time.time()
    with pytest.raises(pt.UserError) as err:
        pt.load_dataset("Hopper-v4", "medium", None, 0, 0)
    assert time.time() - start < 5
    assert "mujoco/hopper/medium-v0" in str(err.value) and "mine/hopper/tiny-v0" in str(err.value)


def test_dataset_env_dim_mismatch_is_an_error(tmp_path):
    path = tmp_path / "door.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"], f["actions"] = np.zeros((5, 39)), np.zeros((5, 28))
        f["rewards"], f["terminals"], f["timeouts"] = np.zeros(5), np.zeros(5, bool), np.ones(5, bool)
    args = pt.Args(
        env_id="Hopper-v4", dataset_path=str(path), checkpoint=str(tmp_path / "x.pt"), runs_dir=str(tmp_path / "runs")
    )
    with pytest.raises(pt.UserError, match=r"dims \(39, 28\).*\(11, 3\)"):
        pt.main(args)


def test_antmaze_state_is_observation_then_goal():
    env = pt.make_env("AntMaze_UMaze-v4")
    obs, _ = env.reset(seed=0)
    inner = env.unwrapped
    assert obs.shape == (29,) == env.observation_space.shape
    np.testing.assert_allclose(obs[-2:], inner.goal)


# ---------------------------------------------------------------- model and loss
def test_tanh_gaussian_log_prob_matches_change_of_variables():
    """p_Y(y) = d/dy P(tanh X <= y) = d/dy Phi(atanh y): finite differences of the base CDF."""
    mean, log_std = torch.tensor([[0.3, -0.5]], dtype=torch.float64), torch.tensor([[-0.2, 0.4]], dtype=torch.float64)
    dist = pt.squashed_gaussian(mean, log_std)
    base = Normal(mean, log_std.exp())
    y, h = torch.tensor([[0.7, -0.2]], dtype=torch.float64), 1e-6
    density = (base.cdf(torch.atanh(y + h)) - base.cdf(torch.atanh(y - h))) / (2 * h)
    torch.testing.assert_close(dist.log_prob(y), density.log().sum(-1), rtol=1e-6, atol=1e-6)


def tiny_model(S=4, A=2, dropout=0.0):
    torch.manual_seed(0)
    return pt.DecisionTransformer(S, A, dropout=dropout, **TINY_MODEL)


def tiny_batch(B=3, T=5, S=4, A=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3], mask[1, :1] = False, False
    return (
        torch.randn(B, T, 1, generator=g),
        torch.randn(B, T, S, generator=g),
        torch.rand(B, T, A, generator=g) * 2 - 1,
        mask,
    )


@pytest.mark.parametrize("init_temperature,entropy_above_target", [(0.1, True), (0.1, False)])
def test_temperature_moves_toward_target_entropy(init_temperature, entropy_above_target):
    model = tiny_model()
    batch = tiny_batch()
    with torch.no_grad():
        _, _, _, entropy = pt.dt_loss(model, torch.tensor(0.0), 0.0, *batch)
    target = entropy.item() - 5 if entropy_above_target else entropy.item() + 5
    log_t = torch.tensor(math.log(init_temperature), requires_grad=True)
    opt = torch.optim.Adam([log_t], lr=1e-2)
    torch.manual_seed(1)
    _, temperature_loss, _, _ = pt.dt_loss(model, log_t, target, *batch)
    opt.zero_grad()
    temperature_loss.backward()
    opt.step()
    moved = log_t.item() - math.log(init_temperature)
    assert (moved < 0) if entropy_above_target else (moved > 0)  # less bonus when entropy is already high


def test_padding_does_not_leak_into_outputs_or_loss():
    model = tiny_model().eval()
    rtg, states, actions, mask = tiny_batch()
    noisy = [x.clone() for x in (rtg, states, actions)]
    for x in noisy:
        x[~mask] = torch.randn_like(x[~mask]) * 100
    m1, s1 = model(rtg, states, actions, mask)
    m2, s2 = model(*noisy, mask)
    torch.testing.assert_close(m1[mask], m2[mask])
    torch.testing.assert_close(s1[mask], s2[mask])
    assert torch.isfinite(m2).all()  # fully padded rows attend to themselves, so no NaN
    torch.manual_seed(0)
    loss1 = pt.dt_loss(model, torch.tensor(-2.0), -2.0, rtg, states, actions, mask)
    torch.manual_seed(0)
    loss2 = pt.dt_loss(model, torch.tensor(-2.0), -2.0, *noisy, mask)
    for a, b in zip(loss1, loss2):
        torch.testing.assert_close(a, b)


def test_model_is_causal():
    """Changing step t must not change the predictions for steps < t."""
    model = tiny_model().eval()
    rtg, states, actions, mask = tiny_batch()
    states2 = states.clone()
    states2[:, 3:] += 10.0
    m1, _ = model(rtg, states, actions, mask)
    m2, _ = model(rtg, states2, actions, mask)
    torch.testing.assert_close(m1[:, :3], m2[:, :3])
    assert not torch.allclose(m1[2, 3:], m2[2, 3:])


def test_lamb_first_step_is_trust_ratio_times_weight_norm_and_it_converges():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20))
    opt = pt.Lamb([w], lr=0.01, weight_decay=0.0)
    before = w.detach().clone()
    (w * torch.randn(20)).sum().backward()
    opt.step()
    # Adam's first step is sign(g) per element, so the LAMB step has norm exactly lr * ||w||.
    assert (w.detach() - before).norm().item() == pytest.approx(0.01 * before.norm().item(), rel=1e-4)

    x, true_w = torch.randn(256, 8), torch.randn(8, 1)
    y = x @ true_w
    layer = torch.nn.Linear(8, 1)
    opt = pt.Lamb(layer.parameters(), lr=0.05, weight_decay=1e-4)
    first = torch.nn.functional.mse_loss(layer(x), y).item()
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first


def test_segment_sampler_left_pads_and_matches_rtg():
    trajs = [
        {
            "observations": np.arange(3, dtype=np.float32)[:, None],
            "actions": np.zeros((3, 1), np.float32),
            "rewards": np.array([1.0, 2.0, 3.0], np.float32),
            "terminals": np.zeros(3, bool),
        }
    ]
    sampler = pt.SegmentSampler(trajs, 4, np.zeros(1, np.float32), np.ones(1, np.float32), 0.5, np.random.default_rng(0))
    rtg, states, _, mask = sampler.sample(64)
    for r, s, m in zip(rtg[..., 0], states[..., 0], mask):
        assert m.sum() >= 1 and not m[: 4 - m.sum()].any()  # left padding only
        start = int(s[m][0])
        np.testing.assert_allclose(r[m], 0.5 * np.array([6.0, 5.0, 3.0])[start : start + m.sum()])


# ---------------------------------------------------------------- end to end
def tiny_args(tmp_path, **kw):
    return tiny_pretrain_args(tmp_path / "h.pt", "Hopper-v4", "local/hopper/medium-v0", **{"num_updates": 10, **kw})


def test_same_seed_same_weights(tmp_path):
    _, _, m1 = pt.main(tiny_args(tmp_path, checkpoint=str(tmp_path / "a.pt")))
    _, _, m2 = pt.main(tiny_args(tmp_path, checkpoint=str(tmp_path / "b.pt")))
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_end_to_end_nll_falls_and_checkpoint_round_trips(tmp_path):
    flags = dict(num_updates=300, batch_size=32, warmup_updates=50, learning_rate=1e-3)
    path, score, model = pt.main(tiny_args(tmp_path, **flags))
    acc = EventAccumulator(str(next((tmp_path / "runs").iterdir())))
    acc.Reload()
    nll = [e.value for e in acc.Scalars("losses/nll")]
    assert nll == sorted(nll, reverse=True) and nll[-1] < 0.7 * nll[0]  # noise actions: the NLL has a floor
    assert math.isfinite(score) and acc.Scalars("charts/normalized_score")

    def load(p):
        ckpt = torch.load(p, weights_only=False)
        m = pt.DecisionTransformer(**{k: v for k, v in ckpt["model_config"].items() if k not in ("activation", "c_offline")})
        m.load_state_dict(ckpt["state_dict"])
        return m, ckpt

    ckpt = check_checkpoint_loads(load, path)
    assert ckpt["env_id"] == "Hopper-v4" and ckpt["dataset_id"] == "local/hopper/medium-v0"
    assert ckpt["model_config"]["c_offline"] == 20 and ckpt["rtg_scale"] == 1e-3
    assert ckpt["target_entropy"] == -3.0 and ckpt["num_updates"] == 300
    assert ckpt["pretrain_args"] == asdict(pt.check(tiny_args(tmp_path, **flags)))  # the settings it ran with
    # The reported score is measured at c_online = 1, the context the finetuning scripts start from.
    assert ckpt["eval_context_len"] == 1 and ckpt["eval_normalized_score"] == score
    meta = dict(
        context_len=1,
        state_mean=ckpt["state_mean"].numpy(),
        state_std=ckpt["state_std"].numpy(),
        rtg_scale=ckpt["rtg_scale"],
        eval_rtg=ckpt["eval_rtg"],
    )
    env, steps = pt.make_env("Hopper-v4"), []
    env.step = lambda a, step=env.step: steps.append(a) or step(a)  # counts the steps evaluate takes
    rets, lengths = pt.evaluate(model, [env], meta, pt.eval_seeds(1, 1), "cpu")
    assert pt.normalized_score(rets, ckpt["ref_min_score"], ckpt["ref_max_score"]).mean() == pytest.approx(score)
    assert lengths.tolist() == [len(steps)] == [acc.Scalars("charts/episodic_length")[-1].value]
    loaded = load(path)[0].eval()
    model.eval()
    batch = tiny_batch(S=11, A=3, T=20)
    torch.testing.assert_close(loaded(*batch)[0], model(*batch)[0], rtol=0, atol=0)


README_CPU_FLAGS = (
    "--embed-dim 128 --n-layers 2 --n-heads 1 --batch-size 32 --context-len 10 --learning-rate 1e-3 "
    "--warmup-updates 150 --num-updates 3000"
)


def test_scale_cpu_is_the_readme_cpu_command():
    preset = pt.check(tyro.cli(pt.Args, args=["--scale", "cpu"]))
    flags = pt.check(tyro.cli(pt.Args, args=README_CPU_FLAGS.split()))
    assert {**asdict(preset), "scale": "paper"} == asdict(flags)
    assert pt.check(pt.Args()).embed_dim == 512 and pt.check(pt.Args()).context_len is None  # Table 6
    assert pt.default_checkpoint_path("Hopper-v4", "local/hopper/medium-v0", 1, "cpu").name == (
        "Hopper-v4__local-hopper-medium-v0__s1__cpu.pt"
    )


def test_an_explicit_size_flag_overrides_the_preset():
    args = pt.check(tyro.cli(pt.Args, args=["--scale", "cpu", "--embed-dim", "64", "--num-updates", "7"]))
    assert (args.embed_dim, args.num_updates) == (64, 7)
    assert (args.n_layers, args.batch_size, args.learning_rate) == (2, 32, 1e-3)  # the rest still from the preset


def test_scale_names_the_default_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, _, model = pt.main(tiny_args(tmp_path, checkpoint=None, scale="cpu", num_updates=2, warmup_updates=1))
    assert path == Path("checkpoints/Hopper-v4__local-hopper-medium-v0__s1__cpu.pt") and path.is_file()
    assert model.embed_state.out_features == TINY_MODEL["embed_dim"]  # the explicit flags of tiny_args won
    assert torch.load(path, weights_only=False)["model_config"]["c_offline"] == 10  # the cpu preset's context


@pytest.mark.parametrize(
    "env_id,dataset,contexts",
    [
        ("Hopper-v4", "mujoco/hopper/medium-v0", (20, 1)),
        ("AdroitHandDoor-v1", "D4RL/door/human-v2", (5, 1)),
        ("AdroitHandHammer-v1", "D4RL/hammer/cloned-v2", (5, 5)),
        ("AntMaze_UMaze-v4", "D4RL/antmaze/umaze-v1", (5, 1)),
        ("AntMaze_UMaze-v4", "D4RL/antmaze/umaze-diverse-v1", (1, 5)),
    ],
)
def test_context_defaults_follow_table6(env_id, dataset, contexts):
    assert pt.default_contexts(*pt.env_family(env_id), dataset) == contexts


@pytest.mark.parametrize(
    "flags,match",
    [
        (dict(num_updates=0), "--num-updates must be > 0, got 0"),
        (dict(batch_size=0), "--batch-size must be > 0, got 0"),
        (dict(context_len=0), "--context-len must be > 0, got 0"),
        (dict(eval_context_len=-1), "--eval-context-len must be > 0, got -1"),
        (dict(embed_dim=0), "--embed-dim must be > 0, got 0"),
        (dict(n_layers=0), "--n-layers must be > 0, got 0"),
        (dict(n_heads=0), "--n-heads must be > 0, got 0"),
        (dict(n_heads=3), "--embed-dim 32 is not divisible by --n-heads 3"),
        (dict(eval_episodes=0), "--eval-episodes must be > 0, got 0"),
        (dict(learning_rate=-1.0), "--learning-rate must be > 0, got -1.0"),
        (dict(learning_rate=float("nan")), "--learning-rate must be > 0, got nan"),
        (dict(temperature_lr=0.0), "--temperature-lr must be > 0, got 0.0"),
        (dict(init_temperature=0.0), "--init-temperature must be > 0, got 0.0"),
        (dict(max_grad_norm=0.0), "--max-grad-norm must be > 0, got 0.0"),
        (dict(rtg_scale=0.0), "--rtg-scale must be > 0, got 0.0"),
        (dict(random_steps=0), "--random-steps must be > 0, got 0"),
        (dict(warmup_updates=-1), "--warmup-updates must be >= 0, got -1"),
        (dict(eval_every=-1), "--eval-every must be >= 0, got -1"),
        (dict(save_every=-1), "--save-every must be >= 0, got -1"),
        (dict(weight_decay=-1e-4), "--weight-decay must be >= 0, got -0.0001"),
        (dict(dropout=1.5), r"--dropout must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_input_is_one_line_and_nothing_runs(tmp_path, flags, match):
    with pytest.raises(pt.UserError, match=f"^{match}$"):
        pt.main(tiny_args(tmp_path, **flags))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "h.pt").exists()


def test_cli_prints_the_error_as_one_line(tmp_path):
    cmd = [sys.executable, "pretrain_dt.py", "--num-updates", "0", "--checkpoint", str(tmp_path / "x.pt")]
    out = subprocess.run(cmd, cwd=Path(pt.__file__).parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr == "error: --num-updates must be > 0, got 0\n"


def test_non_finite_loss_stops_and_keeps_the_previous_checkpoint(tmp_path):
    path, _, _ = pt.main(tiny_args(tmp_path))
    good = path.read_bytes()
    with pytest.raises(pt.UserError, match="non-finite loss at update 2; stopped without writing"):
        pt.main(tiny_args(tmp_path, learning_rate=float("inf"), num_updates=3))  # non-finite weights after one step
    assert path.read_bytes() == good


def test_an_interrupted_run_writes_nothing_at_the_final_path(tmp_path, monkeypatch):
    """Periodic saves go to the run folder; the final path (explicit or default) gets only a finished checkpoint, so
    a finetuning script never picks up a half-trained model."""
    monkeypatch.chdir(tmp_path)
    calls, dt_loss = [], pt.dt_loss

    def interrupted_dt_loss(*a, **kw):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return dt_loss(*a, **kw)

    monkeypatch.setattr(pt, "dt_loss", interrupted_dt_loss)
    for checkpoint, runs_dir in ((str(tmp_path / "final.pt"), tmp_path / "a"), (None, tmp_path / "b")):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            pt.main(tiny_args(tmp_path, checkpoint=checkpoint, runs_dir=str(runs_dir), save_every=5))
        assert not (tmp_path / "final.pt").exists() and not (tmp_path / "checkpoints").exists()
        (saved,) = runs_dir.glob("*/checkpoint.pt")
        ckpt = torch.load(saved, weights_only=False)
        assert ckpt["num_updates"] == 5 and ckpt["format_version"] == pt.CHECKPOINT_FORMAT_VERSION == 2


def test_periodic_saves_go_to_the_run_folder_and_the_end_to_the_final_path(tmp_path):
    path, _, model = pt.main(tiny_args(tmp_path, num_updates=10, save_every=5))
    (run,) = (tmp_path / "runs").iterdir()
    periodic, final = (torch.load(p, weights_only=False) for p in (run / "checkpoint.pt", path))
    assert (periodic["num_updates"], final["num_updates"]) == (10, 10)
    for k, v in model.state_dict().items():
        assert torch.equal(final["state_dict"][k], v) and torch.equal(periodic["state_dict"][k], v)


# ---------------------------------------------------------------- actions on the bounds
def test_action_margin_moves_bound_targets_only():
    """The margin decides where an exact +-1 action sits in pre-tanh space; interior actions are untouched."""
    model = tiny_model()
    rtg, states, actions, mask = tiny_batch()
    nll = {m: pt.dt_loss(model, torch.tensor(-2.0), -2.0, rtg, states, actions, mask, margin=m)[2] for m in (1e-6, 1e-2)}
    torch.testing.assert_close(nll[1e-6], nll[1e-2])  # no action within 1e-2 of a bound
    actions = actions.clone()
    actions[..., 0] = 1.0
    nll = {m: pt.dt_loss(model, torch.tensor(-2.0), -2.0, rtg, states, actions, mask, margin=m)[2] for m in (1e-6, 1e-2)}
    assert not torch.isclose(nll[1e-6], nll[1e-2])


@pytest.mark.parametrize(
    "flags,match",
    [
        (dict(action_margin=0.0), r"--action-margin must be in \(0, 1\), got 0.0"),
        (dict(action_margin=1.0), r"--action-margin must be in \(0, 1\), got 1.0"),
        (dict(censor_bound=0.0), r"--censor-bound must be in \(0, 1\), got 0.0"),
        (dict(censor_bound=1.0), r"--censor-bound must be in \(0, 1\), got 1.0"),
    ],
)
def test_bad_action_flags_are_one_clear_error(tmp_path, flags, match):
    with pytest.raises(pt.UserError, match=match):
        pt.main(tiny_args(tmp_path, **flags))


def pretrain_on_bound_heavy_data(tmp_path, **flags):
    """A dataset where a third of the states' actions sit exactly on +1 (the rest interior at 0.2), pretrained briefly
    at context 1; returns (checkpoint, model in eval mode, normalised on-bound states, normalised interior states)."""
    tmp_path.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    n = 3000
    obs = rng.normal(size=(n, 11))
    on_bound = obs[:, 0] > 0.43  # about a third of the states
    actions = np.where(on_bound[:, None], 1.0, 0.2).repeat(3, 1) * np.ones((n, 3))
    timeouts = np.zeros(n, bool)
    timeouts[99::100] = True
    path = tmp_path / "hopper-bounds-v2.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"], f["actions"], f["rewards"] = obs, actions.astype(np.float32), np.ones(n)
        f["terminals"], f["timeouts"] = np.zeros(n, bool), timeouts
    schedule = dict(num_updates=300, context_len=1, learning_rate=3e-3, warmup_updates=20, batch_size=64)
    ckpt_path, _, model = pt.main(tiny_args(tmp_path, dataset_path=str(path), **{**schedule, **flags}))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)

    def normalised(x):
        return torch.as_tensor((x[:200] - ckpt["state_mean"].numpy()) / ckpt["state_std"].numpy(), dtype=torch.float32)

    return ckpt, model.eval(), normalised(obs[on_bound]), normalised(obs[~on_bound])


def head_at(model, states):
    """(pre-tanh mean, log-std) of the policy at single states (context 1)."""
    n = len(states)
    with torch.no_grad():
        mean, log_std = model(
            torch.ones(n, 1, 1) * 0.1, states[:, None], torch.zeros(n, 1, 3), torch.ones(n, 1, dtype=torch.bool)
        )
    return mean[:, -1], log_std[:, -1]


def test_bound_heavy_data_does_not_saturate_interior_actions(tmp_path):
    """After a short pretraining with the default objective, the evaluation action tanh(mean) at interior states is not
    driven to the bound, and the checkpoint records the margin it was trained with."""
    ckpt, model, _, interior = pretrain_on_bound_heavy_data(tmp_path)
    assert ckpt["action_margin"] == pt.Args.action_margin
    action = torch.tanh(head_at(model, interior)[0])
    assert (action.abs() < 0.9).float().mean() > 0.9, action.abs().mean()
    assert (action - 0.2).abs().mean() < 0.25


def test_censor_bound_changes_the_loss_on_bound_targets_only(tmp_path):
    """--censor-bound scores an exact +-1 as a point mass (the pull toward 7.25 is tested in test_action_log_prob.py);
    a batch with no action on a bound has the same loss, and a pretraining run records the bound in its checkpoint
    (0.99 by default, None with `--censor-bound None`)."""
    model = tiny_model()
    rtg, states, actions, mask = tiny_batch()

    def nll(acts, censor_bound):
        return pt.dt_loss(model, torch.tensor(-2.0), -2.0, rtg, states, acts, mask, censor_bound=censor_bound)[2]

    torch.testing.assert_close(nll(actions, None), nll(actions, 0.99), rtol=0, atol=1e-5)
    on_bound = actions.clone()
    on_bound[..., 0] = 1.0
    assert (nll(on_bound, 0.99) - nll(on_bound, None)).abs() > 1  # a probability against a density far in the tail
    path, _, _ = pt.main(tiny_args(tmp_path, num_updates=3))
    assert torch.load(path, map_location="cpu", weights_only=False)["censor_bound"] == 0.99  # the default
    path, _, _ = pt.main(tiny_args(tmp_path, censor_bound=None, num_updates=3))  # ODT's density, one switch away
    assert torch.load(path, map_location="cpu", weights_only=False)["censor_bound"] is None


def test_anneal_lr_warms_up_then_follows_a_half_cosine_to_zero():
    args = pt.Args(warmup_updates=10, num_updates=110)
    assert [pt.lr_factor(u, args) for u in (1, 5, 10, 60, 110)] == [0.1, 0.5, 1.0, 1.0, 1.0]  # ODT's: constant
    annealed = pt.Args(warmup_updates=10, num_updates=110, anneal_lr=True)
    assert [pt.lr_factor(u, annealed) for u in (1, 5, 10)] == [0.1, 0.5, 1.0]
    assert pt.lr_factor(60, annealed) == pytest.approx(0.5) and pt.lr_factor(110, annealed) == pytest.approx(0.0)
    factors = [pt.lr_factor(u, annealed) for u in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # never rises again after the warm-up
