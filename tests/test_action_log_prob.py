"""Every script scores an action exactly as pretraining's likelihood does, on and near the +-1 bounds."""

import inspect

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
def test_each_script_scores_actions_as_pretraining_does(script, margin):
    mean, log_std = head(n=len(BOUND_ACTIONS))
    actions = torch.tensor(BOUND_ACTIONS, dtype=torch.float64)[:, None].repeat(1, 3)
    ours = pretrain_dt.action_log_prob(mean, log_std, actions, margin)
    theirs = script.action_log_prob(mean, log_std, actions, margin)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert torch.isfinite(ours).all()
    # the bound itself is scored at the clamp point +-(1 - margin): a point mass there, not a density at +-1
    clamp = torch.tensor(1 - margin, dtype=torch.float64).expand(len(BOUND_ACTIONS), 3)
    torch.testing.assert_close(ours[0], pretrain_dt.action_log_prob(mean, log_std, clamp, margin)[0])


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


def test_checkpoint_records_the_margin_and_odt_nll_uses_it(hopper_checkpoint):
    """ODT's online NLL scores stored actions with the margin the checkpoint was pretrained with."""
    ckpt = torch.load(hopper_checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["action_margin"] == pretrain_dt.Args.action_margin
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
        _, info = odt_td3.actor_loss(model, None, batch, "odt", 0.0, torch.tensor(0.1), action_margin=margin)
        mean, log_std = model(batch["rtg"], batch["states"], batch["actions"], batch["mask"])
        expected = -pretrain_dt.action_log_prob(mean, log_std, batch["actions"], margin).mean()
        torch.testing.assert_close(info["nll"], expected.detach())
        nll[margin] = info["nll"].item()
    assert nll[1e-6] != nll[1e-2]
