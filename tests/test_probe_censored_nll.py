"""benchmarks/probe_censored_nll.py (issue #17): on-bound actions scored as a point mass, interior ones as before;
and bench_dt_vs_bc.py's --dt-script runs it in place of pretrain_dt.py."""

import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import tiny_pretrain_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_dt_vs_bc  # noqa: E402
import probe_censored_nll  # noqa: E402

import pretrain_dt  # noqa: E402

MARGIN = 1e-6


def test_interior_actions_keep_pretrain_dt_density():
    torch.manual_seed(0)
    mean, log_std = torch.randn(64, 3), 0.5 * torch.randn(64, 3)
    actions = torch.empty(64, 3).uniform_(-0.999, 0.999)
    censored = probe_censored_nll.censored_action_log_prob(mean, log_std, actions, MARGIN, bound=0.99)
    assert torch.allclose(censored, pretrain_dt.action_log_prob(mean, log_std, actions, MARGIN), atol=1e-4)


def test_on_bound_dims_are_the_probability_past_the_bound():
    mean, log_std = torch.tensor([[3.0, -1.0, 0.2]]), torch.tensor([[0.0, math.log(0.5), -1.0]])
    actions = torch.tensor([[1.0, -1.0, 0.3]])  # +1, -1, interior
    c = math.atanh(0.99)
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = (
        math.log(normal.cdf(torch.tensor((3.0 - c) / 1.0)))
        + math.log(normal.cdf(torch.tensor((-c + 1.0) / 0.5)))
        + pretrain_dt.action_log_prob(mean[:, 2:], log_std[:, 2:], actions[:, 2:], MARGIN).item()
    )
    got = probe_censored_nll.censored_action_log_prob(mean, log_std, actions, MARGIN, bound=0.99).item()
    assert math.isclose(got, expected, rel_tol=1e-5)
    # a wider bound asks for more mass further out: a lower log-prob for the same policy
    wider = probe_censored_nll.censored_action_log_prob(mean, log_std, actions, MARGIN, bound=0.999).item()
    assert wider < got


def test_a_bound_action_stops_pulling_the_mean_once_the_policy_is_past_the_bound():
    """The density pulls the pre-tanh mean toward atanh(1 - 1e-6) = 7.25; the point mass is satisfied by 4.5."""
    mean = torch.tensor([[4.5]], requires_grad=True)
    log_std = torch.tensor([[math.log(0.5)]])
    action = torch.tensor([[1.0]])
    censored = probe_censored_nll.censored_action_log_prob(mean, log_std, action, MARGIN, bound=0.99)
    (grad_censored,) = torch.autograd.grad(censored.sum(), mean)
    density = pretrain_dt.action_log_prob(mean, log_std, action, MARGIN)
    (grad_density,) = torch.autograd.grad(density.sum(), mean)
    assert censored.item() > -1e-3 and 0 < grad_censored.item() < 1e-2
    assert grad_density.item() > 10  # (7.25 - 4.5) / 0.25 = 11: still pulled hard outward


def test_bench_runs_the_dt_script_it_is_given(tmp_path):
    base = dict(datasets=("Hopper-v4:local/hopper/medium-v0",), seeds=1, bc="none", out_dir=str(tmp_path))
    (_, default), *_ = bench_dt_vs_bc.jobs(bench_dt_vs_bc.Args(**base), tmp_path)
    (_, probe), *_ = bench_dt_vs_bc.jobs(
        bench_dt_vs_bc.Args(**base, dt_script="benchmarks/probe_censored_nll.py", dt_flags="--censor-bound 0.99"), tmp_path
    )
    assert Path(default[1]).name == "pretrain_dt.py"
    assert Path(probe[1]) == ROOT / "benchmarks" / "probe_censored_nll.py"
    assert probe[probe.index("--censor-bound") + 1] == "0.99"


def test_probe_pretrains_end_to_end(tmp_path):
    ckpt = tmp_path / "probe.pt"
    tiny = tiny_pretrain_args(ckpt, "Hopper-v4", "local/hopper/medium-v0", num_updates=5, batch_size=8)
    args = probe_censored_nll.Args(**asdict(tiny), censor_bound=0.99)
    saved = pretrain_dt.action_log_prob
    try:
        probe_censored_nll.main(args)
    finally:
        pretrain_dt.action_log_prob = saved  # the probe swaps it for its own process; keep the suite's copy
    assert ckpt.is_file() and torch.load(ckpt, weights_only=False)["num_updates"] == 5


def test_a_censor_bound_outside_0_1_is_a_one_line_error(tmp_path):
    tiny = tiny_pretrain_args(tmp_path / "x.pt", "Hopper-v4", "local/hopper/medium-v0")
    for bound in (0.0, 1.0, 1.5):
        with pytest.raises(pretrain_dt.UserError, match="--censor-bound must lie strictly between 0 and 1"):
            probe_censored_nll.main(probe_censored_nll.Args(**asdict(tiny), censor_bound=bound))
    assert pretrain_dt.action_log_prob.__name__ == "action_log_prob"  # rejected before anything was swapped
