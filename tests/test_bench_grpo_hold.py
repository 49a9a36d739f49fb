"""benchmarks/bench_grpo_hold.py: finished runs leave committed records, and a report rebuilt from the records alone
(the git-ignored raw logs gone, as on a fresh machine) gives the same table."""

import json
import shutil
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_grpo_hold  # noqa: E402

CURVES = {
    ("default", 1): [40.0, 60.0, 80.0, 70.0, 65.0, 66.0, 64.0],
    ("default", 2): [41.0, 50.0, 90.0, 55.0, 60.0, 62.0, 61.0],
}


def finish_run(out: Path, arm: str, seed: int, scores: list[float]):
    """What a finished `grpo_dt.py` run leaves under raw/: its TensorBoard log and its `.done` marker."""
    writer = SummaryWriter(str(out / "raw" / arm / f"s{seed}" / "Hopper-v4__grpo__1__1"))
    for iteration, score in enumerate(scores):
        writer.add_scalar("charts/normalized_score", score, iteration)
    writer.close()
    (out / "raw" / arm / f"s{seed}.done").write_text(f"python grpo_dt.py --seed {seed}\n")


def test_report_from_records_alone_matches_report_from_raw_logs(tmp_path, capsys):
    out = tmp_path / "hold"
    for (arm, seed), scores in CURVES.items():
        finish_run(out, arm, seed, scores)
    args = bench_grpo_hold.Args(name=str(out), report_only=True)  # an absolute name is the results folder itself
    bench_grpo_hold.main(args)
    from_raw = (out / "summary.md").read_text()
    record = json.loads((out / "records" / "default" / "s2.json").read_text())
    assert record["scores"] == CURVES[("default", 2)]
    assert record["command"] == "python grpo_dt.py --seed 2"

    shutil.rmtree(out / "raw")
    (out / "summary.md").unlink()
    (out / "records" / "default" / "s1_diag.json").write_text("{}\n")  # an analysis's side file is not a run
    bench_grpo_hold.main(args)
    from_records = (out / "summary.md").read_text()
    assert from_records == from_raw
    # start / peak / last-5 per seed: s1 40 / 80 / mean(80, 70, 65, 66, 64) = 69; s2 41 / 90 / mean(90, 55, 60, 62, 61) = 65.6
    assert "s1: 40.0 / 80.0 / 69.0; s2: 41.0 / 90.0 / 65.6" in from_records
    assert "python grpo_dt.py --seed 1" in from_records


def test_run_command_scale_and_script(tmp_path):
    """Every run gets --scale (cpu by default: grpo_dt.py's narrow exploration, what the committed `default` arms ran);
    an arm that sets one of grpo_dt_fast.py's worker flags runs that script; the arm's flags come last."""
    args = bench_grpo_hold.Args(checkpoint="c.pt", iterations=3)
    cmd = bench_grpo_hold.run_command(args, tmp_path, "default", "", 2)
    assert cmd[1] == "grpo_dt.py" and cmd[cmd.index("--scale") + 1] == "cpu" and cmd[cmd.index("--seed") + 1] == "2"
    assert cmd[cmd.index("--checkpoint") + 1] == "c.pt" and cmd[cmd.index("--num-iterations") + 1] == "3"
    paper = bench_grpo_hold.run_command(bench_grpo_hold.Args(checkpoint="c.pt", scale="paper"), tmp_path, "p", "", 1)
    assert paper[paper.index("--scale") + 1] == "paper" and paper[1] == "grpo_dt.py"
    fast = bench_grpo_hold.run_command(args, tmp_path, "w", "--num-workers 4 --checkpoint d.pt", 1)
    assert fast[1] == "grpo_dt_fast.py" and fast[-4:] == ["--num-workers", "4", "--checkpoint", "d.pt"]
    assert "c.pt" not in fast  # the arm's own checkpoint wins
    narrow_off = bench_grpo_hold.run_command(args, tmp_path, "paper", "--no-narrow-exploration", 1)
    assert narrow_off[1] == "grpo_dt.py" and narrow_off[-1] == "--no-narrow-exploration"


def test_records_name_the_commit_their_run_started_at(tmp_path):
    out = tmp_path / "hold"
    for (arm, seed), scores in CURVES.items():
        finish_run(out, arm, seed, scores)
    bench_grpo_hold.write_record(out, "default", 1, "python grpo_dt.py --seed 1", "abc1234567")
    bench_grpo_hold.main(bench_grpo_hold.Args(name=str(out), report_only=True))
    summary = (out / "summary.md").read_text()
    assert json.loads((out / "records" / "default" / "s1.json").read_text())["commit"] == "abc1234567"
    assert "- `python grpo_dt.py --seed 1` at abc1234567" in summary
    assert "- `python grpo_dt.py --seed 2` at (commit not recorded)" in summary  # a record from before commits were kept
