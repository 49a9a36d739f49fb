"""One evaluation protocol: every finetuning DT script scores the same checkpoint identically.

Same `eval_seeds`, RTG, context and tanh(mean) actions with dropout off: the iteration-0 scores of the four scripts
are equal to each other and to pretrain_dt.py's own `evaluate` of that checkpoint.
"""

import dataclasses
import re

import numpy as np
import pytest
import torch
from conftest import ROOT, make_tiny_checkpoint

import grpo_dt
import grpo_dt_qguided
import odt_td3
import ppo_dt
import pretrain_dt

SCRIPTS = {"grpo_dt": grpo_dt, "grpo_dt_qguided": grpo_dt_qguided, "ppo_dt": ppo_dt, "odt_td3": odt_td3}
EVAL = dict(eval_episodes=3, eval_rtg=1500.0, eval_context_len=3, max_episode_steps=60)
SMALL = {  # the fewest envs and updates each script accepts; nothing here is used with 0 iterations
    "grpo_dt": dict(trajs_per_iter=1, reset_points=1, group_size=2),
    "grpo_dt_qguided": dict(),
    "ppo_dt": dict(k_ppo=1),
    "odt_td3": dict(),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Hopper DT with dropout 0.1, so that an evaluation with dropout on would not match."""
    path = tmp_path_factory.mktemp("protocol") / "hopper.pt"
    return make_tiny_checkpoint(path, "Hopper-v4", "local/hopper/medium-v0", dropout=0.1, context_len=5)


def iteration_zero_score(name: str, ckpt, tmp_path, **eval_flags) -> float:
    module = SCRIPTS[name]
    args = module.Args(
        env_id="Hopper-v4",
        dataset="local/hopper/medium-v0",
        checkpoint=str(ckpt),
        runs_dir=str(tmp_path / name),
        num_iterations=0,
        save_every=0,
        **SMALL[name],
        **{**EVAL, **eval_flags},
    )
    out = module.main(args)
    return float(out[0]["normalized_score"] if isinstance(out, list) else out)


def pretrain_score(ckpt_path, eval_episodes, eval_rtg, eval_context_len, max_episode_steps, seed=1) -> float:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    cfg = {k: v for k, v in ckpt["model_config"].items() if k not in ("activation", "c_offline")}
    model = pretrain_dt.DecisionTransformer(**cfg)
    model.load_state_dict(ckpt["state_dict"])
    meta = dict(context_len=eval_context_len, state_mean=ckpt["state_mean"].numpy(), state_std=ckpt["state_std"].numpy())
    meta.update(rtg_scale=ckpt["rtg_scale"], eval_rtg=eval_rtg)
    envs = [pretrain_dt.make_env("Hopper-v4", max_episode_steps=max_episode_steps) for _ in range(eval_episodes)]
    rets, _ = pretrain_dt.evaluate(model, envs, meta, pretrain_dt.eval_seeds(seed, eval_episodes), "cpu")
    return float(pretrain_dt.normalized_score(rets, ckpt["ref_min_score"], ckpt["ref_max_score"]).mean())


def test_iteration_zero_scores_are_identical_across_scripts_and_pretrain(checkpoint, tmp_path):
    """Equal up to the float64 rounding of how a return is summed (np.sum's pairwise order or step by step)."""
    scores = {name: iteration_zero_score(name, checkpoint, tmp_path) for name in SCRIPTS}
    reference = pretrain_score(checkpoint, **EVAL)
    for name, score in scores.items():
        assert score == pytest.approx(reference, rel=1e-9), (name, scores, reference)


def test_eval_flags_change_the_score(checkpoint, tmp_path):
    """Each flag is used: another RTG or context gives another score (checked on two scripts that roll out differently)."""
    base = {name: iteration_zero_score(name, checkpoint, tmp_path / "base") for name in ("grpo_dt", "odt_td3")}
    for flag in (dict(eval_rtg=100.0), dict(eval_context_len=1)):
        for name, score in base.items():
            assert iteration_zero_score(name, checkpoint, tmp_path / "other", **flag) != score, (name, flag)


def test_defaults_are_the_checkpoints_rtg_and_c_online(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    flags = dict(eval_rtg=None, eval_context_len=None, eval_episodes=2)
    explicit = dict(eval_rtg=ckpt["eval_rtg"], eval_context_len=1, eval_episodes=2)  # Table 6 c_online of Hopper: 1
    for name in ("grpo_dt_qguided", "ppo_dt"):
        assert iteration_zero_score(name, checkpoint, tmp_path, **flags) == iteration_zero_score(
            name, checkpoint, tmp_path, **explicit
        )
    assert odt_td3.apply_presets(odt_td3.Args(env_id="Hopper-v4")).eval_context_len == 5  # its --c-online, ODT's 5


def test_eval_seeds_of_run_seeds_1_and_2_are_disjoint():
    for module in (*SCRIPTS.values(), pretrain_dt):
        a, b = module.eval_seeds(1, 1000), module.eval_seeds(2, 1000)
        assert len(np.intersect1d(a, b)) == 0 and len(set(a)) == 1000
        assert np.array_equal(module.eval_seeds(1, 3), [100_000, 100_001, 100_002])


def field_doc(script: str, field: str) -> str:
    """The comment after an Args field, read from the source."""
    for line in (ROOT / script).read_text().splitlines():
        if re.match(rf"    {field}: .* = .*  # ", line):
            return line.split("  # ", 1)[1]
    raise KeyError(field)


def test_max_seconds_is_documented_identically():
    docs = {s: field_doc(f"{s}.py", "max_seconds") for s in SCRIPTS}
    assert len(set(docs.values())) == 1, docs


BUDGET = ("num_iterations", "total_env_steps", "max_seconds")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_resume_keeps_the_runs_own_settings_and_budget(name, tmp_path):
    """--resume goes on with the saved run's settings and budget; a budget flag given anew wins; any other setting
    given with another value than the run's is a one-line error; a file that is not this script's run state too."""
    module = SCRIPTS[name]
    saved = module.Args(seed=7, max_episode_steps=60, num_iterations=2, runs_dir="old")
    state = tmp_path / "state.pt"
    torch.save({"args": dataclasses.asdict(saved)}, state)
    resumed, loaded = module.resume_args(module.Args(resume=str(state)), BUDGET)
    assert (resumed.seed, resumed.max_episode_steps, resumed.num_iterations, resumed.runs_dir) == (7, 60, 2, "old")
    assert resumed.resume == str(state) and loaded["args"] == dataclasses.asdict(saved)
    assert module.resume_args(module.Args(resume=str(state), num_iterations=9), BUDGET)[0].num_iterations == 9
    assert module.resume_args(module.Args(resume=str(state), seed=7), BUDGET)[0].seed == 7  # the run's own value
    with pytest.raises(
        module.UserError, match=r"only --num-iterations, --total-env-steps, --max-seconds may change, not --seed"
    ):
        module.resume_args(module.Args(resume=str(state), seed=8), BUDGET)
    assert module.resume_args(saved, BUDGET) == (saved, None)  # no --resume: the command's own Args
    torch.save({"state_dict": {}}, tmp_path / "checkpoint.pt")
    (tmp_path / "log.txt").write_text("not a state")
    other = next(m for n, m in SCRIPTS.items() if n != name)  # a state another finetuning script saved
    torch.save({"args": dataclasses.asdict(other.Args())}, tmp_path / "other.pt")
    for bad, message in [
        ("checkpoint.pt", f"is not a run state of {name}.py"),
        ("other.pt", f"is not a run state of {name}.py"),
        ("log.txt", "cannot be read by torch.load"),
        ("nope.pt", "does not exist"),
    ]:
        with pytest.raises(module.UserError, match=message):
            module.resume_args(module.Args(resume=str(tmp_path / bad)), BUDGET)
