"""Reinformer (pretrain_dt.py --arch reinformer) and GRPO-DT on it (Fig. 4a): token order, expectile loss, acting on
the predicted return-to-go, exact ratios and resets, the frozen or trained RTG head, the scripts that refuse it."""

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_checkpoint, tiny_pretrain_args
from test_grpo_dt import episodes, make_hopper_setup, scalars, tiny_args, with_

import grpo_dt
import grpo_dt_fast
import grpo_dt_qguided
import odt_td3
import ppo_dt
import pretrain_dt as pt

HOPPER = ("Hopper-v4", "local/hopper/medium-v0")


@pytest.fixture(scope="module")
def reinformer_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("rf") / "rf.pt", *HOPPER, arch="reinformer")


@pytest.fixture(scope="module")
def setup(reinformer_checkpoint):
    return make_hopper_setup(reinformer_checkpoint)


def tiny_model(**kw):
    torch.manual_seed(0)
    return pt.Reinformer(state_dim=3, act_dim=2, embed_dim=16, n_layers=2, n_heads=2, dropout=0.0, **kw).eval()


def test_tokens_are_state_rtg_action():
    """The RTG prediction at s_t sees s_t and earlier steps, never R_t or a_t; the action output at R_t sees R_t."""
    model, g = tiny_model(), torch.Generator().manual_seed(1)
    x = [torch.randn(2, 4, d, generator=g) for d in (1, 3, 2)] + [torch.ones(2, 4, dtype=torch.bool)]
    mean, _, rtg_hat = model(*x)
    for i, changed_from in ((1, 2), (0, 3), (2, 3)):  # state s_2, RTG R_2, action a_2 perturbed
        y = [v.clone() for v in x]
        y[i][:, 2] += 1.0
        mean2, _, rtg_hat2 = model(*y)
        assert torch.equal(rtg_hat2[:, :changed_from], rtg_hat[:, :changed_from]), i
        assert not torch.allclose(rtg_hat2[:, changed_from:], rtg_hat[:, changed_from:]), i
        assert torch.equal(mean2[:, :2], mean[:, :2]) and (i == 2) == torch.equal(mean2[:, 2], mean[:, 2]), i
    assert set(model.state_dict()) - set(pt.DecisionTransformer(3, 2, 16, 2, 2).state_dict()) == {
        "rtg_head.weight",
        "rtg_head.bias",
    }


@pytest.mark.parametrize("tau", [0.5, 0.99])
def test_expectile_loss_matches_a_slow_reference(tau):
    g = torch.Generator().manual_seed(0)
    pred, target, mask = (
        torch.randn(3, 5, generator=g),
        4 * torch.randn(3, 5, generator=g),
        torch.rand(3, 5, generator=g) > 0.3,
    )
    norm = np.mean([abs(t) for t, m in zip(target.flatten().tolist(), mask.flatten().tolist()) if m])
    terms = []
    for p, t, m in zip(pred.flatten().tolist(), target.flatten().tolist(), mask.flatten().tolist()):
        if m:
            u = (t - p) / norm
            terms.append((tau if u >= 0 else 1 - tau) * u * u)
    loss = pt.expectile_loss(pred, target, mask, tau)
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)
    if tau == 0.5:  # half the MSE of the normalised residual
        assert loss.item() == pytest.approx(0.5 * (((target - pred) / norm)[mask] ** 2).mean().item(), rel=1e-5)
    assert torch.equal(grpo_dt.expectile_loss(pred, target, mask, tau), loss)


def test_acting_writes_the_predicted_rtg_before_the_action(setup):
    """grpo_dt.Policy: R-hat from the state first, written into the RTG slot, then the action on it; so neither
    rollouts nor pretrain_dt.py's evaluation depend on the RTG they are started with."""
    policy, g = setup["policy"], torch.Generator().manual_seed(0)
    win = [1e3 * torch.ones(5, 3, 1), torch.randn(5, 3, 11, generator=g), torch.randn(5, 3, 3, generator=g)]
    win.append(torch.ones(5, 3, dtype=torch.bool))
    before = [x.clone() for x in win]
    with torch.inference_mode():
        mean, _ = policy(win)
        rtg_hat = setup["model"](*before)[2][:, -1]
        torch.testing.assert_close(win[0][:, -1], rtg_hat)
        assert torch.equal(win[0][:, :-1], before[0][:, :-1]) and not torch.allclose(rtg_hat, before[0][:, -1])
        torch.testing.assert_close(mean, setup["model"](*win)[0][:, -1])
        assert not torch.allclose(mean, setup["model"](*before)[0][:, -1])
    runs = [episodes(policy, setup["envs"], [3, 4], rtg, c=3, sampled=False)[0] for rtg in (0.0, 1e4)]
    for k in ("rtg", "actions", "reward"):
        np.testing.assert_array_equal(runs[0][k], runs[1][k])
    meta = {**setup["ckpt"], "context_len": 3}
    model = pt.Reinformer(**{k: v for k, v in meta["model_config"].items() if k not in ("activation", "c_offline", "arch")})
    model.load_state_dict(meta["state_dict"])
    returns = [pt.evaluate(model, [pt.make_env(HOPPER[0])], {**meta, "eval_rtg": r}, [7], "cpu")[0] for r in (0, 1e4)]
    assert returns[0] == returns[1]


def test_sequence_ratio_is_one_before_an_update(setup):
    items, *_ = grpo_dt.collect_groups(setup["policy"], setup["envs"], setup["trajs"], setup["args"], setup["rng"])
    buf = grpo_dt.SubtrajBuffer(64, "cpu")
    buf.add(items)
    batch = buf.sample(16, setup["rng"])
    _, stats = grpo_dt.grpo_backward(setup["model"], copy.deepcopy(setup["model"]), batch, setup["args"], 0.1)
    assert abs(stats["ratio_mean"] - 1) < 1e-4 and abs(stats["ratio_max"] - 1) < 1e-4 and stats["kl"] == 0.0
    setup["model"].zero_grad()


def test_a_reset_replays_the_stored_trajectory_exactly(setup):
    """From a reset point of a recorded tanh(mean) episode, the same model acting tanh(mean) replays it bit for bit: the
    stored R-hat prefix is the context, and R-hat, states and rewards come out as recorded; the group shares it all."""
    s = setup
    _, (traj,) = episodes(s["policy"], s["envs"], [5], 0.0, c=3, sampled=False)
    args = with_(s["args"], subtraj_len=0, eval_len=6, trajs_per_iter=1, reset_points=2)
    items, _, _, out = grpo_dt.collect_groups(s["policy"], s["envs"], [traj], args, np.random.default_rng(1))
    assert (out["reset_step"] > 0).any()
    for m, h in enumerate(out["reset_step"]):
        n = out["valid"][m].sum()
        assert n == min(6, len(traj["reward"]) - h)
        for k in ("rtg", "states", "actions", "reward"):
            np.testing.assert_array_equal(out[k][m, :n], traj[k][h : h + n], err_msg=k)


def test_rtg_head_is_frozen_unless_trained(setup):
    """Default: no gradient reaches the RTG head. --train-rtg-head: the expectile loss on each sampled step's
    discounted return to the member's end (in RTG units) trains it."""
    s = setup
    for train in (False, True):
        args = with_(s["args"], train_rtg_head=train, delta_r=-1.0)
        items, rewards, _, out = grpo_dt.collect_groups(s["policy"], s["envs"], s["trajs"], args, np.random.default_rng(0))
        assert ("ret" in items) == train
        if train:
            r, L = out["reward"], args.subtraj_len
            slow = [
                [sum(args.gamma ** (j - t) * r[m, j] for j in range(t, r.shape[1])) for t in range(L)] for m in range(len(r))
            ]
            np.testing.assert_allclose(items["ret"], np.array(slow) * s["scale"], rtol=1e-5)
            np.testing.assert_allclose(items["ret"][:, 0], rewards.ravel() * s["scale"], rtol=1e-5)  # Eq. 2's reward
        buf = grpo_dt.SubtrajBuffer(64, "cpu")
        buf.add(items)
        model = copy.deepcopy(s["model"])
        _, stats = grpo_dt.grpo_backward(model, copy.deepcopy(model), buf.sample(8, s["rng"]), args, 0.1)
        grad = model.rtg_head.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == train and ("rtg_loss" in stats) == train


def test_end_to_end_pretrain_and_grpo(reinformer_checkpoint, tmp_path):
    ckpt = torch.load(reinformer_checkpoint, weights_only=False)
    assert ckpt["format_version"] == 2 and ckpt["model_config"]["arch"] == "reinformer"
    assert ckpt["model_config"]["expectile"] == 0.99 and "rtg_head.weight" in ckpt["state_dict"]
    assert "losses/rtg_loss" in scalars(reinformer_checkpoint.parent / "runs")
    heads = {}
    for train in (False, True):
        args = tiny_args(reinformer_checkpoint, tmp_path / str(train), save_model=True, train_rtg_head=train, delta_r=0.0)
        assert np.isfinite(grpo_dt.main(args))
        (run,) = (tmp_path / str(train) / "runs").iterdir()
        ft = torch.load(run / "grpo_dt.pt", weights_only=False)
        assert ft["model_config"]["arch"] == "reinformer" and ("losses/rtg_loss" in scalars(run.parent)) == train
        assert not torch.equal(ft["state_dict"]["mean_head.weight"], ckpt["state_dict"]["mean_head.weight"])
        heads[train] = torch.equal(ft["state_dict"]["rtg_head.weight"], ckpt["state_dict"]["rtg_head.weight"])
        assert isinstance(grpo_dt.load_model(run / "grpo_dt.pt")[0], grpo_dt.Reinformer)
    assert heads == {False: True, True: False}  # frozen by default, trained with --train-rtg-head
    score = grpo_dt.main(tiny_args(reinformer_checkpoint, tmp_path / "zero", num_iterations=0, max_episode_steps=None))
    assert score == pytest.approx(ckpt["eval_normalized_score"], abs=1e-6)  # pretrain_dt.py acts the same way


def test_other_scripts_refuse_a_reinformer_in_one_line(reinformer_checkpoint, hopper_checkpoint, tmp_path):
    for script in (ppo_dt, grpo_dt_qguided, odt_td3):
        with pytest.raises(script.UserError) as e:
            script.load_model(reinformer_checkpoint)
        name = script.__name__
        assert (
            str(e.value) == f"--checkpoint {str(reinformer_checkpoint)!r} holds a reinformer model; {name}.py finetunes ['dt']"
        )
    args = grpo_dt_fast.Args(**tiny_args(reinformer_checkpoint, tmp_path).__dict__ | {"exp_name": "fast"})
    with pytest.raises(
        grpo_dt.UserError, match="^grpo_dt_fast.py finetunes DT checkpoints; finetune a Reinformer with grpo_dt.py$"
    ):
        grpo_dt_fast.main(args)
    with pytest.raises(grpo_dt.UserError, match="^--train-rtg-head trains a Reinformer's RTG prediction"):
        grpo_dt.main(tiny_args(hopper_checkpoint, tmp_path / "dt", train_rtg_head=True))
    with pytest.raises(pt.UserError, match=r"^--expectile must be in \[0, 1\], got 1.5$"):
        pt.main(tiny_pretrain_args(tmp_path / "x.pt", *HOPPER, arch="reinformer", expectile=1.5))
    assert not (tmp_path / "x.pt").exists()


def test_arch_dt_is_unchanged(tmp_path):
    """A DT ignores the Reinformer's settings: same weights whatever --expectile, no arch in its config, DT's loss."""
    paths = [make_tiny_checkpoint(tmp_path / f"{tau}.pt", *HOPPER, num_updates=5, expectile=tau) for tau in (0.5, 0.99)]
    a, b = (torch.load(p, weights_only=False) for p in paths)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert not {"arch", "expectile"} & set(a["model_config"]) and "rtg_head.weight" not in a["state_dict"]
    assert type(grpo_dt.load_model(paths[0])[0]) is grpo_dt.DecisionTransformer
    model, batch = pt.DecisionTransformer(3, 2, 16, 1, 2), [torch.randn(2, 4, d) for d in (1, 3, 2)]
    assert len(pt.dt_loss(model, torch.tensor(0.0), -2.0, *batch, torch.ones(2, 4, dtype=torch.bool))) == 4
