"""Every script scores an action exactly as pretraining's likelihood does, on and near the +-1 bounds, with ODT's
density or with the censored likelihood (`--censor-bound`: an action on +-1 scored as a point mass)."""

import inspect
import math

import pytest
import torch

import grpo_dt
import grpo_dt_qguided
import odt_td3
import ppo_dt
import pretrain_dt

SCRIPTS = [grpo_dt, grpo_dt_qguided, odt_td3, ppo_dt]


def head(n=5, act_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, act_dim, generator=g, dtype=torch.float64) * 2, torch.rand(
        n, act_dim, generator=g, dtype=torch.float64
    ) * 3 - 2


# on the bounds, a hair inside them, just inside a 1e-2 margin, and interior
BOUND_ACTIONS = [1.0, -1.0, 1 - 1e-7, -(1 - 1e-7), 1 - 1e-3, 0.95, -0.3]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("margin", [1e-6, 1e-2])
@pytest.mark.parametrize("censor_bound", [None, 0.99])
def test_each_script_scores_actions_as_pretraining_does(script, margin, censor_bound):
    mean, log_std = head(n=len(BOUND_ACTIONS))
    actions = torch.tensor(BOUND_ACTIONS, dtype=torch.float64)[:, None].repeat(1, 3)
    ours = pretrain_dt.action_log_prob(mean, log_std, actions, margin, censor_bound)
    theirs = script.action_log_prob(mean, log_std, actions, margin, censor_bound)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert torch.isfinite(ours).all()
    if censor_bound is None:  # the bound itself is scored at the clamp point +-(1 - margin), as ODT does
        clamp = torch.tensor(1 - margin, dtype=torch.float64).expand(len(BOUND_ACTIONS), 3)
        torch.testing.assert_close(ours[0], pretrain_dt.action_log_prob(mean, log_std, clamp, margin)[0])
    else:  # interior actions keep the density; the bound is scored as a probability (<= 0)
        density = pretrain_dt.action_log_prob(mean, log_std, actions, margin)
        torch.testing.assert_close(ours[-3:], density[-3:], rtol=0, atol=0)
        assert (ours[:2] <= 0).all() and not torch.isclose(ours[:2], density[:2]).any()


def test_censored_interior_actions_keep_the_density():
    torch.manual_seed(0)
    mean, log_std = torch.randn(64, 3), 0.5 * torch.randn(64, 3)
    actions = torch.empty(64, 3).uniform_(-0.999, 0.999)
    censored = pretrain_dt.action_log_prob(mean, log_std, actions, 1e-6, censor_bound=0.99)
    torch.testing.assert_close(censored, pretrain_dt.action_log_prob(mean, log_std, actions, 1e-6), rtol=0, atol=1e-4)


def test_censored_on_bound_dims_are_the_probability_past_the_bound():
    mean, log_std = torch.tensor([[3.0, -1.0, 0.2]]), torch.tensor([[0.0, math.log(0.5), -1.0]])
    actions = torch.tensor([[1.0, -1.0, 0.3]])  # +1, -1, interior
    edge, normal = math.atanh(0.99), torch.distributions.Normal(0.0, 1.0)
    expected = (
        math.log(normal.cdf(torch.tensor((3.0 - edge) / 1.0)))  # P(u >= atanh 0.99), u ~ N(3, 1)
        + math.log(normal.cdf(torch.tensor((-edge + 1.0) / 0.5)))  # P(u <= -atanh 0.99), u ~ N(-1, 0.5)
        + pretrain_dt.action_log_prob(mean[:, 2:], log_std[:, 2:], actions[:, 2:], 1e-6).item()
    )
    got = pretrain_dt.action_log_prob(mean, log_std, actions, 1e-6, censor_bound=0.99).item()
    assert math.isclose(got, expected, rel_tol=1e-5)
    # a wider bound asks for more mass further out: a lower log-prob for the same policy
    assert pretrain_dt.action_log_prob(mean, log_std, actions, 1e-6, censor_bound=0.999).item() < got


def test_censored_bound_action_stops_pulling_the_mean_once_the_policy_is_past_the_bound():
    """The density pulls the pre-tanh mean toward atanh(1 - 1e-6) = 7.25; the point mass is satisfied by 4.5."""
    mean = torch.tensor([[4.5]], requires_grad=True)
    log_std, action = torch.tensor([[math.log(0.5)]]), torch.tensor([[1.0]])
    censored = pretrain_dt.action_log_prob(mean, log_std, action, 1e-6, censor_bound=0.99)
    (grad_censored,) = torch.autograd.grad(censored.sum(), mean)
    density = pretrain_dt.action_log_prob(mean, log_std, action, 1e-6)
    (grad_density,) = torch.autograd.grad(density.sum(), mean)
    assert censored.item() > -1e-3 and 0 < grad_censored.item() < 1e-2
    assert grad_density.item() > 10  # (7.25 - 4.5) / 0.25 = 11: still pulled hard outward


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_shared_likelihood_source_is_identical(script):
    for name in ("squashed_gaussian", "action_log_prob"):
        assert inspect.getsource(getattr(script, name)) == inspect.getsource(getattr(pretrain_dt, name)), name


def test_grpo_pre_tanh_log_prob_agrees_near_the_bounds():
    """GRPO-DT scores its own samples from the pre-tanh u (exact, no atanh round trip). Inside the clamp it is the same
    number as pretraining's action log-prob of tanh(u); near the bound too (float64)."""
    mean, log_std = head(n=4)
    for margin in (1e-6, 1e-2):
        edge = torch.atanh(torch.tensor(1 - margin, dtype=torch.float64))
        u = torch.stack([edge - 1e-3, -(edge - 1e-3), edge * 0.5, torch.tensor(0.1, dtype=torch.float64)])[:, None]
        u = u.repeat(1, 3)
        torch.testing.assert_close(
            grpo_dt.squashed_logprob(mean, log_std, u),
            pretrain_dt.action_log_prob(mean, log_std, torch.tanh(u), margin),
            rtol=1e-9,
            atol=1e-6,
        )


def test_checkpoint_records_the_margin_and_odt_nll_uses_it(hopper_checkpoint, monkeypatch):
    """ODT's online NLL scores stored actions with the margin and censor bound the checkpoint was pretrained with."""
    ckpt = torch.load(hopper_checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["action_margin"] == pretrain_dt.Args.action_margin
    assert ckpt["censor_bound"] == pretrain_dt.Args.censor_bound == 0.99  # the point mass by default
    model, _ = odt_td3.load_model(hopper_checkpoint)
    model.eval()  # the same forward twice: no dropout
    g = torch.Generator().manual_seed(0)
    T, S, A = 4, ckpt["model_config"]["state_dim"], ckpt["model_config"]["act_dim"]
    batch = {
        "rtg": torch.randn(2, T, 1, generator=g),
        "states": torch.randn(2, T, S, generator=g),
        "actions": torch.rand(2, T, A, generator=g) * 2 - 1,
        "mask": torch.ones(2, T, dtype=torch.bool),
    }
    batch["actions"][:, ::2, 0] = 1.0  # exact bound actions
    nll = {}
    for margin in (1e-6, 1e-2):
        _, info = odt_td3.actor_loss(model, None, batch, "odt", 0.0, torch.tensor(0.1), margin, None)
        mean, log_std = model(batch["rtg"], batch["states"], batch["actions"], batch["mask"])
        expected = -pretrain_dt.action_log_prob(mean, log_std, batch["actions"], margin).mean()
        torch.testing.assert_close(info["nll"], expected.detach())
        nll[margin] = info["nll"].item()
    assert nll[1e-6] != nll[1e-2]
    _, info = odt_td3.actor_loss(model, None, batch, "odt", 0.0, torch.tensor(0.1), 1e-6, 0.99)
    mean, log_std = model(batch["rtg"], batch["states"], batch["actions"], batch["mask"])
    expected = -pretrain_dt.action_log_prob(mean, log_std, batch["actions"], 1e-6, 0.99).mean()
    torch.testing.assert_close(info["nll"], expected.detach())
    assert info["nll"].item() != nll[1e-6]
    # The run's updates score with the checkpoint's margin and censor bound.
    args = odt_td3.apply_presets(odt_td3.Args(env_id="Hopper-v4", dataset="local/hopper/medium-v0", algo="odt", n_batch=4))
    learner = odt_td3.make_learner(args, model, {**ckpt, "censor_bound": 0.99}, torch.device("cpu"))
    zeros = torch.zeros(7, S).numpy()  # one 6-step trajectory with its final observation
    learner["buffer"] = [dict(observations=zeros, actions=zeros[:6, :A], rewards=zeros[:6, 0] + 1, terminated=False)]
    used, real = [], odt_td3.action_log_prob
    monkeypatch.setattr(odt_td3, "action_log_prob", lambda *a: used.append(a[3:]) or real(*a))
    odt_td3.update(args, {**ckpt, "censor_bound": 0.99}, learner, 0, 1)
    assert used == [(ckpt["action_margin"], 0.99)]
