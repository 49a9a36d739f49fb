"""benchmarks/compare.py: the summary table and the plot from synthetic TensorBoard logs, failed runs, bad input."""

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402

# method -> per-seed final scores; every curve rises linearly to its final score over 5 iterations, one per 10 s, so
# the last quarter of a run's logging time (LATE_WINDOW) holds iterations 4 and 5: a late mean of 0.9 x final.
FINAL = {"ODT": [40.0, 50.0], "GRPO-DT": [60.0, 70.0], "PPO-DT": [55.0, 65.0]}


def write_log(run_dir: Path, final: float, n_iter: int = 5, steps_per_iter: int = 1000):
    w = SummaryWriter(str(run_dir / "Hopper-v4__x__1__123"))
    for it in range(n_iter + 1):
        wall = 1000.0 + 10 * it
        w.add_scalar("charts/normalized_score", final * it / n_iter, it, walltime=wall)
        w.add_scalar("charts/env_steps", it * steps_per_iter, it, walltime=wall)
        w.add_scalar("charts/grad_updates", it * 10, it, walltime=wall)
    w.close()


def make_runs(tmp_path: Path, failed: dict = None) -> dict:
    failed = failed or {}
    sections = {}
    for label, finals in FINAL.items():
        m = compare.Method(label.lower(), label, "x.py")
        runs = []
        for seed, final in enumerate(finals, 1):
            r = compare.Run("hopper", m, seed, cmd=["python", "x.py"], returncode=0, wall_time=10.0 * seed)
            if (label, seed) in failed:
                r.returncode, r.error = 1, failed[label, seed]
            else:
                write_log(tmp_path / label / str(seed), final)
                r.scalars = compare.read_scalars(tmp_path / label / str(seed))
            runs.append(r)
        sections[m.key] = runs
    return {"hopper": sections}


def row(md: str, label: str) -> str:
    return next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))


def test_read_scalars(tmp_path):
    write_log(tmp_path, 50.0)
    s = compare.read_scalars(tmp_path)
    steps, values, wall = s["charts/normalized_score"]
    assert list(steps) == [0, 1, 2, 3, 4, 5] and values[-1] == pytest.approx(50.0)
    np.testing.assert_allclose(wall, 1000 + 10 * steps)
    assert s["charts/env_steps"][1][-1] == 5000
    assert compare.read_scalars(tmp_path / "nothing") == {}


def test_summary_and_plot(tmp_path):
    sections = make_runs(tmp_path)
    md = compare.format_summary("t", ["- h"], sections)
    for label, finals in FINAL.items():
        mean, std = np.mean(finals), np.std(finals)
        late = f"{0.9 * mean:.2f} ± {0.9 * std:.2f}"
        assert f"| {mean:.2f} ± {std:.2f} | {late} | 0.00 | 2/2 | 5,000 | 50 | 15.0 | — | ok |" in row(md, label)
    assert "| 65.00 ± 5.00 | 58.50 ± 4.50 |" in row(md, "GRPO-DT")  # hand-computed: (48 + 60) / 2, (56 + 70) / 2
    assert "| GRPO-DT | 2 | 0 | 70.00 | 63.00 |" in md
    with_paper = compare.format_summary("t", [], sections, {"hopper": {"grpo-dt": "108.81 ± 0.85"}})
    assert row(with_paper, "GRPO-DT").endswith("| ok | 108.81 ± 0.85 |") and row(with_paper, "ODT").endswith("| — |")
    png = tmp_path / "curves.png"
    compare.plot_curves(sections, png, "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_failed_runs_are_reported_never_dropped_never_zero(tmp_path):
    sections = make_runs(
        tmp_path,
        failed={("PPO-DT", 1): "exit 1: RuntimeError: boom", ("PPO-DT", 2): "exit 2: x", ("ODT", 2): "exit 137: killed"},
    )
    md = compare.format_summary("t", [], sections)
    ppo = row(md, "PPO-DT")
    assert "| FAILED | — | — | 0/2 |" in ppo and "exit 1: RuntimeError: boom" in ppo and "exit 2: x" in ppo
    assert "0.00" not in ppo
    odt = row(md, "ODT")  # partly failed: the mean is over the finished seed only, and the failure is listed
    assert "| 40.00 ± 0.00 | 36.00 ± 0.00 | 0.00 | 1/2 |" in odt and "partly FAILED" in odt and "exit 137: killed" in odt
    assert "| PPO-DT | 1 | 1 | FAILED |" in md  # the per-run table keeps it too
    sections["hopper"]["grpo-dt"][1].returncode = None  # not run yet (the table is rewritten after every run)
    assert "| 60.00 ± 0.00 | 54.00 ± 0.00 | 0.00 | 1/2 |" in row(compare.format_summary("t", [], sections), "GRPO-DT")
    assert "ok (1 pending)" in row(compare.format_summary("t", [], sections), "GRPO-DT")
    compare.plot_curves(sections, tmp_path / "curves.png", "t")  # a failed method does not break the plot
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_seed_band_interpolates_within_each_seed():
    grid = np.array([0.0, 1.0, 2.0, 3.0])
    mean, std = compare.seed_band(
        [(np.array([0.0, 2.0]), np.array([0.0, 2.0])), (np.array([0.0, 3.0]), np.array([0.0, 6.0]))], grid
    )
    np.testing.assert_allclose(mean, [0.0, 1.5, 3.0, np.nan])  # x=3: only one seed has data, so no mean
    np.testing.assert_allclose(std, [0.0, 0.5, 1.0, np.nan])


def test_score_curves_env_steps_start_at_zero():
    r = compare.Run(
        "hopper",
        compare.DT,
        1,
        returncode=0,
        scalars={
            "charts/normalized_score": (np.array([0, 1, 2]), np.array([5.0, 6.0, 7.0])),
            "charts/env_steps": (np.array([1, 2]), np.array([100.0, 250.0])),
        },
    )  # iteration 0 not logged
    (it, score), (env, score2) = compare.score_curves(r)
    np.testing.assert_allclose(env, [0, 100, 250])
    np.testing.assert_allclose(score2, [5, 6, 7])


def test_last_line_finds_the_error():
    tyro_box = (
        "╭─ Unrecognized options ──╮\n│ Unrecognized options: --foo, 4 │\n│ For full helptext, run x.py --help │\n╰────╯\n"
    )
    assert compare.last_line(tyro_box) == "Unrecognized options: --foo, 4"
    assert compare.last_line("Traceback (most recent call last):\n  File x\nValueError: bad\n") == "ValueError: bad"
    assert compare.last_line("it 1\rit 2\r") == "it 2" and compare.last_line("") == "(no stderr)"


def test_bad_input_is_one_line_error(tmp_path):
    with pytest.raises(compare.UserError, match="unknown --preset 'nope'; valid: table1-cpu, fig1-relabel"):
        compare.main(compare.Args(preset="nope"))
    with pytest.raises(compare.UserError, match="unknown --methods.*valid: dt, iql, dt-odt-context, odt"):
        compare.main(compare.Args(methods=("sac",), dry_run=True))
    with pytest.raises(compare.UserError, match="one task"):
        compare.main(compare.Args(checkpoint=str(tmp_path / "c.pt")))


def test_presets_dry_run(capsys):
    for preset in (
        "table1-cpu",
        "fig1-relabel",
        "fig2-ablations",
        "fig4-lengths",
        "fig4a-models",
        "fig4b-qguided",
        "ppo-ctrain",
    ):
        for scale in ("cpu", "paper"):
            compare.main(compare.Args(preset=preset, scale=scale, seeds=(1,), budget_env_steps=1000, dry_run=True))
    out = capsys.readouterr().out
    assert "--relabel" in out and "--full-trajectory" in out and "--subtraj-len 5" in out and "--eval-len" in out
    assert "grpo_dt_qguided.py" in out and "--algo odt" in out and "--total-env-steps 1000" in out
    full = [ln.split()[1] for ln in out.splitlines() if ln.startswith("python ") and "--full-trajectory" in ln]
    assert full and set(full) == {"grpo_dt_fast.py"}  # Fig. 2a's whole-episode updates run in bounded-memory chunks
    relabeled = [ln.split()[1] for ln in out.splitlines() if ln.startswith("python ") and ln.endswith("--relabel")]
    assert {"ppo_dt.py", "grpo_dt.py"} <= set(relabeled)  # Fig. 1: both pure-RL methods with and without --relabel
    ctrain = [ln for ln in out.splitlines() if "--exp-name ppo-dt-ctrain-offline " in ln]
    assert [ln.endswith(f"--c-train {c}") for ln, c in zip(ctrain, (10, 20))] == [True, True]
    # cpu scale: the README's CPU DT; ODT+TD3's segments batched by 32 and 1000 critic-pretraining updates; Q-guided's
    # critic batch 32; GRPO-DT and PPO-DT at their paper sizes. Paper scale: no overrides.
    cpu = [ln for ln in out.splitlines() if "__cpu__" in ln and ln.startswith("python ")]
    assert all("--scale cpu" in ln for ln in cpu if ln.startswith("python pretrain_dt.py"))
    assert all("--n-batch 32 --critic-pretrain-updates 1000" in ln for ln in cpu if "odt_td3.py" in ln)
    assert all("--critic-batch-size 32" in ln for ln in cpu if "grpo_dt_qguided.py" in ln)
    assert all("--trajs-per-iter" not in ln and "--n-batch" not in ln for ln in cpu if "grpo_dt.py" in ln or "ppo_dt" in ln)
    paper = [ln for ln in out.splitlines() if "__paper__" in ln and "--exp-name" in ln]
    assert paper and all("--n-batch" not in ln and "--critic" not in ln for ln in paper)
    # Every script that takes the checkpoint gets the scale: at cpu, grpo_dt.py explores narrowly (its --scale cpu
    # default, what the cpu presets always ran); at paper, the paper's sigma and epsilon. IQL has no --scale.
    assert all(" --scale cpu " in ln for ln in cpu if "--exp-name" in ln)
    assert all(" --scale paper " in ln for ln in paper) and "--narrow-exploration" not in out
    pretrain = [ln for ln in out.splitlines() if ln.startswith("python pretrain_dt.py")]
    assert pretrain and all(f"--scale {'cpu' if '__cpu__' in ln else 'paper'}" in ln for ln in pretrain)
    dt = [ln for ln in out.splitlines() if "--exp-name dt " in ln]  # the pretrained DT only evaluates: no budget
    assert dt and all(ln.endswith("--num-iterations 0") and "--total-env-steps" not in ln for ln in dt)
    # IQL takes no checkpoint and no iterations: the env-step budget is its online length; at cpu scale it pretrains
    # as many updates as the shared cpu DT (3000), at paper scale its own default (the paper's 5000).
    iql = [ln for ln in out.splitlines() if ln.startswith("python iql.py")]
    assert len(iql) == 4 and all(f not in ln for ln in iql for f in ("--checkpoint", "--num-iterations", "--scale"))
    assert all("--online-steps 1000 --total-env-steps 1000" in ln for ln in iql)
    assert sum("--offline-updates 3000" in ln for ln in iql) == 2 and all("--eval-episodes 20" in ln for ln in iql)


def test_fig4a_pretrains_a_dt_and_a_reinformer_of_one_size_and_finetunes_each_on_one_budget(capsys):
    compare.main(compare.Args(preset="fig4a-models", scale="paper", seeds=(1, 2), budget_iterations=7, dry_run=True))
    lines = capsys.readouterr().out.splitlines()
    ckpts = [ln.split()[-1] for ln in lines if ln.startswith("# hopper")]
    pretrain = [ln for ln in lines if ln.startswith("python pretrain_dt.py")]
    assert (
        len(set(ckpts)) == 2
        and len(pretrain) == 2
        and pretrain[1]
        == pretrain[0].replace(
            f"--scale paper --checkpoint {ckpts[0]}", f"--scale paper --arch reinformer --checkpoint {ckpts[1]}"
        )
    )
    runs = {ln.split("--exp-name ")[1].split()[0]: ln for ln in lines if "--exp-name" in ln and "--seed 1 " in ln}
    assert set(runs) == {"dt", "grpo-dt", "reinformer", "grpo-reinformer"}
    for dt, rf in (("dt", "reinformer"), ("grpo-dt", "grpo-reinformer")):  # the same command but for the checkpoint
        assert f"--checkpoint {ckpts[0]} " in runs[dt] and f"--checkpoint {ckpts[1]} " in runs[rf]
        assert runs[rf].replace(ckpts[1], ckpts[0]).replace(f"/{rf}/", f"/{dt}/").replace(f" {rf} ", f" {dt} ") == runs[dt]
    assert runs["grpo-dt"].endswith("--num-iterations 7") and runs["reinformer"].endswith("--num-iterations 0")
    with pytest.raises(compare.UserError, match="--checkpoint is one model; preset fig4a-models compares several"):
        compare.main(compare.Args(preset="fig4a-models", checkpoint=__file__, dry_run=True))


def test_cpu_scale_is_the_readme_cpu_dt():
    import pretrain_dt

    assert compare.CPU_DT_UPDATES == pretrain_dt.SCALES["cpu"]["num_updates"]
    assert compare.PRETRAIN_LIKELIHOOD == ("--censor-bound", str(pretrain_dt.Args.censor_bound))  # named, so hashed
    assert compare.CHECKPOINT_FORMAT_VERSION == pretrain_dt.CHECKPOINT_FORMAT_VERSION


def test_shared_checkpoint_name_carries_the_format(capsys, monkeypatch):
    """A checkpoint of another format is never reused: the format is hashed into the shared checkpoint's name."""
    args = compare.Args(preset="table1-cpu", seeds=(1,), tasks=("hopper",), methods=("dt",), dry_run=True)

    def checkpoint_path():
        compare.main(args)
        return next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("# hopper")).split()[-1]

    now = checkpoint_path()
    assert now.startswith("checkpoints/compare/Hopper-v4__local-hopper-medium-v0__cpu__") and now.endswith(".pt")
    monkeypatch.setattr(compare, "CHECKPOINT_FORMAT_VERSION", compare.CHECKPOINT_FORMAT_VERSION - 1)
    assert checkpoint_path() != now


def test_budget_iterations_sets_every_iteration_scripts_num_iterations(capsys):
    """--budget-iterations: --num-iterations N for every finetuning method (not the checkpoint-only DT row, not IQL,
    which has no iterations); beside another budget, it replaces the 100000-iteration cap."""

    def commands(**budget) -> dict[str, str]:
        compare.main(compare.Args(preset="table1-cpu", seeds=(1,), tasks=("hopper",), dry_run=True, **budget))
        lines = [ln for ln in capsys.readouterr().out.splitlines() if "--exp-name" in ln]
        return {ln.split("--exp-name ")[1].split()[0]: ln for ln in lines}

    plain, by_iters = commands(), commands(budget_iterations=7)
    finetuning = ("odt", "odt-td3", "ppo-dt", "grpo-dt", "qguided")
    assert all("--num-iterations" not in plain[k] for k in finetuning)  # no budget: each script's own count
    assert all(by_iters[k].endswith("--num-iterations 7") or " --num-iterations 7 " in by_iters[k] for k in finetuning)
    assert by_iters["dt"].endswith("--num-iterations 0") and by_iters["dt"].count("--num-iterations") == 1
    assert by_iters["iql"] == plain["iql"]  # no iterations and no other budget: iql.py's own online length
    both = commands(budget_iterations=7, budget_env_steps=500)
    assert all(" --num-iterations 7 --total-env-steps 500" in both[k] for k in finetuning)
    assert "--online-steps 500 --total-env-steps 500" in both["iql"] and "--num-iterations" not in both["iql"]
    seconds = commands(budget_seconds=60)
    assert all(" --num-iterations 100000 --max-seconds 60" in seconds[k] for k in finetuning)


def test_iql_gets_the_same_seeds_budget_and_eval_episodes(capsys):
    compare.main(
        compare.Args(
            preset="table1-cpu",
            seeds=(1, 2),
            budget_seconds=60,
            eval_episodes=7,
            tasks=("door",),
            methods=("iql", "odt"),
            dry_run=True,
        )
    )
    lines = capsys.readouterr().out.splitlines()
    iql, odt = ([ln for ln in lines if f"--exp-name {m} " in ln] for m in ("iql", "odt"))
    for a, b in zip(iql, odt):
        for flag in ("--env-id AdroitHandDoor-v1", "--dataset local/door/human-v0", "--max-seconds 60", "--eval-episodes 7"):
            assert flag in a and flag in b
    assert [ln.split("--seed ")[1][0] for ln in iql] == ["1", "2"]
    assert all("--online-steps 10000000" in ln for ln in iql)  # the wall-clock budget stops it
    only_iql = compare.main(compare.Args(preset="table1-cpu", seeds=(1,), tasks=("door",), methods=("iql",), dry_run=True))
    assert only_iql and "# no DT checkpoint needed" in capsys.readouterr().out


def test_every_dt_method_gets_the_same_eval_flags_at_its_own_context(capsys):
    """One protocol: g_online of the task and the same episodes; each method at the context it acts with (Table 6's
    c_online, ODT's 5 on MuJoCo); the pretrained DT at both; IQL gets the episodes only."""
    compare.main(compare.Args(preset="table1-cpu", seeds=(1, 2), dry_run=True))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("python ") and "--exp-name" in ln]
    for env_id, rtg, odt_context in (("Hopper-v4", 7200, 5), ("AdroitHandDoor-v1", 3000, 1)):
        runs = [ln for ln in lines if f"--env-id {env_id}" in ln]
        dt, iql = [ln for ln in runs if "iql.py" not in ln], [ln for ln in runs if "iql.py" in ln]
        assert len(dt) == 2 * 8 and len(iql) == 2
        for ln in dt:
            odt = "odt_td3.py" in ln or "--exp-name dt-odt-context" in ln
            assert f"--eval-episodes 20 --eval-rtg {rtg} --eval-context-len {odt_context if odt else 1}" in ln, ln
            assert all(ln.count(f"{f} ") == 1 for f in ("--eval-episodes", "--eval-rtg", "--eval-context-len"))
        paper_row = [ln for ln in dt if "--exp-name grpo-dt-paper" in ln]  # its own --scale last, so it wins
        assert len(paper_row) == 2 and all(ln.endswith("--scale paper") for ln in paper_row)
        assert all("--eval-episodes 20" in ln and "--eval-rtg" not in ln for ln in iql)
    compare.main(compare.Args(preset="table1-cpu", seeds=(1,), tasks=("door",), eval_rtg=40, eval_episodes=3, dry_run=True))
    dt = [ln for ln in capsys.readouterr().out.splitlines() if "--exp-name" in ln and "iql.py" not in ln]
    assert dt and all("--eval-episodes 3 --eval-rtg 40 --eval-context-len 1" in ln for ln in dt)


def test_odt_context_is_odt_td3s_own(tmp_path):
    """compare.py's ODT context is the context odt_td3.py acts and evaluates with by default, per env."""
    import odt_td3

    for env_id in ("Hopper-v4", "Walker2d-v4", "AdroitHandDoor-v1", "AdroitHandPen-v1", "AdroitHandHammer-v1"):
        args = odt_td3.apply_presets(odt_td3.Args(env_id=env_id, dataset="x"))
        odt = next(m for m in compare.TABLE1 if m.key == "odt")
        assert compare.eval_context(odt, env_id, "x") == args.c_online == args.eval_context_len, env_id


def test_env_step_methods_plot_on_the_env_step_panel_only(tmp_path):
    r = compare.Run(
        "hopper",
        compare.IQL,
        1,
        returncode=0,
        scalars={"charts/normalized_score": (np.array([0, 1000, 2000]), np.array([30.0, 40.0, 50.0]))},
    )
    it_curve, (env, score) = compare.score_curves(r)
    assert it_curve is None and env.tolist() == [0, 1000, 2000] and score.tolist() == [30.0, 40.0, 50.0]
    sections = make_runs(tmp_path)
    sections["hopper"]["iql"] = [r]
    ((by_iteration, by_env_steps),) = compare.plot_curves(sections, tmp_path / "curves.png", "t")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    # IQL's x is env steps (up to 2000): never on the iteration panel (iterations 0-5), always on the env-step one
    assert max((ln.get_xdata().max() for ln in by_iteration.lines if len(ln.get_xdata())), default=0) <= 5
    assert any(len(ln.get_xdata()) and ln.get_xdata().max() == 2000 for ln in by_env_steps.lines)


FAKE_PRETRAIN = """
import argparse, pathlib
p = argparse.ArgumentParser(); p.add_argument("--checkpoint"); a, _ = p.parse_known_args()
pathlib.Path(a.checkpoint).parent.mkdir(parents=True, exist_ok=True); pathlib.Path(a.checkpoint).write_text("ckpt")
"""
FAKE_FINETUNE = """
import argparse, pathlib, sys, time
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
p = argparse.ArgumentParser()
for f in ("--checkpoint", "--runs-dir", "--env-id", "--exp-name"): p.add_argument(f)
for f in ("--seed", "--num-iterations", "--total-env-steps"): p.add_argument(f, type=int, default=0)
a, _ = p.parse_known_args()
assert pathlib.Path(a.checkpoint).read_text() == "ckpt"
run_dir = f"{a.runs_dir}/{a.env_id}__{a.exp_name}__{a.seed}__{int(time.time())}"
w = EventFileWriter(run_dir)
offset = 0 if "--eval-rtg" in sys.argv else 100  # scored at the checkpoint's own RTG: 100 more
for it in range(a.num_iterations + 1):
    for tag, v in (("charts/normalized_score", 10 * it + a.seed + offset), ("charts/env_steps", 100 * it),
                   ("charts/grad_updates", 4 * it)):
        value = Summary.Value(tag=tag, simple_value=v)
        w.add_event(Event(wall_time=time.time(), step=it, summary=Summary(value=[value])))
    if a.total_env_steps and 100 * it >= a.total_env_steps:
        break
w.close()
if "--save-model" in sys.argv:
    pathlib.Path(f"{run_dir}/{a.exp_name}.pt").write_text("ckpt")
"""
FAKE_IQL = """
import argparse, sys, time
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
assert "--checkpoint" not in sys.argv and "--num-iterations" not in sys.argv
p = argparse.ArgumentParser()
for f in ("--runs-dir", "--env-id", "--exp-name"): p.add_argument(f)
for f in ("--seed", "--online-steps", "--total-env-steps", "--offline-updates"): p.add_argument(f, type=int, default=0)
a, _ = p.parse_known_args()
w = EventFileWriter(f"{a.runs_dir}/{a.env_id}__{a.exp_name}__{a.seed}__{int(time.time())}")
for step in range(0, a.online_steps + 1, 100):  # logged against env steps
    for tag, v in (("charts/normalized_score", 20 + step / 10 + a.seed), ("charts/env_steps", step),
                   ("charts/grad_updates", a.offline_updates + step)):
        value = Summary.Value(tag=tag, simple_value=v)
        w.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=[value])))
w.close()
"""
FAKE_FAILING = "import sys\nsys.stderr.write('loading...\\nValueError: bad shapes\\n')\nsys.exit(3)\n"


def test_end_to_end_with_fake_scripts(tmp_path, capsys):
    for name, src in (
        ("pretrain_dt.py", FAKE_PRETRAIN),
        ("grpo_dt.py", FAKE_FINETUNE),
        ("ppo_dt.py", FAKE_FAILING),
        ("iql.py", FAKE_IQL),
    ):
        (tmp_path / name).write_text(textwrap.dedent(src))
    args = compare.Args(
        preset="table1-cpu",
        tasks=("hopper",),
        methods=("grpo-dt", "ppo-dt", "iql"),
        seeds=(1, 2),
        budget_env_steps=300,
        scripts_dir=str(tmp_path),
        results_dir=str(tmp_path / "results"),
        checkpoints_dir=str(tmp_path / "ckpt"),
    )
    out_dir = compare.main(args)
    md = (out_dir / "summary.md").read_text()
    grpo = row(md, "GRPO-DT (CPU preset)")  # at --scale cpu, beside the paper settings' row
    assert "| GRPO-DT (CPU preset) | 1 | 31.50 ± 0.50 |" in grpo
    assert "| 1.50 | 2/2 | 300 | 12 |" in grpo  # stopped by the env-step budget
    # Its final model (--save-model) is scored again by grpo_dt.py at the checkpoint's own RTG (no --eval-rtg).
    assert "| 101.50 ± 0.50 | ok |" in row(md, "GRPO-DT (CPU preset)")
    data_rtg = (out_dir / "raw" / "logs" / "hopper" / "grpo-dt__s2-data-rtg.out").parent.glob("grpo-dt__s*-data-rtg.err")
    assert len(list(data_rtg)) == 2 and "| — | ok |" in row(md, "IQL")
    # IQL: 300 online env steps after 3000 offline updates; its iteration 0 is its score after pretraining.
    assert (
        "| IQL | — | 51.50 ± 0.50 |" in row(md, "IQL")
        and "| 21.50 | 2/2 | 300 | 3,300 |" in row(md, "IQL")
        and "| 74.19 ± 20.25 |" in row(md, "IQL")
    )
    ppo = row(md, "PPO-DT")
    assert "| FAILED | — | — | 0/2 |" in ppo and "exit 3: ValueError: bad shapes" in ppo
    assert (out_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out_dir / "bars.png").read_bytes()[:4] == b"\x89PNG"
    assert "- script versions (sha1 of the file at each run's start): grpo_dt.py " in md and "changed" not in md
    # each run's record names the commit it started at; the summary lists them (6 runs, all at this checkout's)
    commit = json.loads((out_dir / "records" / "hopper" / "grpo-dt__s1.json").read_text())["commit"]
    assert commit == compare.git_commit() and f"- commit at each run's start: {commit or 'not recorded'} (6 runs)" in md
    (out_dir / "summary.md").unlink()
    compare.main(compare.Args(**{**vars(args), "summarize_only": True}))  # rebuilt from the recorded runs alone
    assert (out_dir / "summary.md").read_text().split("## hopper")[1] == md.split("## hopper")[1]
    # A summary made without the budget flags keeps each run's own command, the budget in it (a rerun would not).
    compare.main(compare.Args(**{**vars(args), "summarize_only": True, "budget_env_steps": 0}))
    assert (out_dir / "summary.md").read_text().split("## hopper")[1] == md.split("## hopper")[1]
    kept_grpo = json.loads((out_dir / "records" / "hopper" / "grpo-dt__s1.json").read_text())["command"]
    assert "--total-env-steps 300" in kept_grpo
    shutil.rmtree(out_dir / "raw")  # a fresh machine: the git-ignored logs are gone, the kept records are not
    compare.main(compare.Args(**{**vars(args), "summarize_only": True}))
    assert (out_dir / "summary.md").read_text().split("## hopper")[1] == md.split("## hopper")[1]
    assert sorted(p.name for p in (out_dir / "records" / "hopper").iterdir())[:2] == ["grpo-dt__s1.json", "grpo-dt__s2.json"]
    # Another comparison of the same checkpoint and flags may reuse kept runs; each shows the command it ran with.
    fig1_records = tmp_path / "results" / "fig1-relabel" / "records" / "hopper"
    fig1_records.mkdir(parents=True)
    for kept in (out_dir / "records" / "hopper").glob("grpo-dt__s*.json"):
        shutil.copy(kept, fig1_records)
    fig1 = compare.Args(**{**vars(args), "preset": "fig1-relabel", "methods": ("grpo-dt",), "summarize_only": True})
    fig1_md = (compare.main(fig1) / "summary.md").read_text()
    assert "| GRPO-DT | 1 | 31.50 ± 0.50 |" in row(fig1_md, "GRPO-DT")
    assert "--runs-dir " + str(tmp_path / "results" / "table1-cpu" / "raw" / "runs" / "hopper" / "grpo-dt" / "s1") in fig1_md
    progress = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[") and "/6]" in ln]
    assert len(progress) == 6 and "[4/6] hopper PPO-DT seed 2: FAILED (exit 3: ValueError: bad shapes)" in progress[3]
    # Started again, it keeps the finished runs and runs only the failed ones; --rerun runs everything.
    compare.main(args)
    progress = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[") and "/6]" in ln]
    assert sum("finished earlier, kept" in ln for ln in progress) == 4 and sum("FAILED" in ln for ln in progress) == 2
    again = (out_dir / "summary.md").read_text()
    assert all(row(again, label) == row(md, label) for label in ("GRPO-DT (CPU preset)", "IQL"))
    # A run that failed here and was redone elsewhere: its copied-in record beats the local failure, and stays.
    redone = json.loads((out_dir / "records" / "hopper" / "grpo-dt__s1.json").read_text())
    (out_dir / "records" / "hopper" / "ppo-dt__s1.json").write_text(json.dumps(redone) + "\n")
    compare.main(compare.Args(**{**vars(args), "summarize_only": True}))
    assert "| 1/2 |" in row((out_dir / "summary.md").read_text(), "PPO-DT")
    assert json.loads((out_dir / "records" / "hopper" / "ppo-dt__s1.json").read_text()) == redone
    compare.main(compare.Args(**{**vars(args), "rerun": True}))
    assert not any("kept" in ln for ln in capsys.readouterr().out.splitlines())
