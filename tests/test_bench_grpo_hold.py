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
    bench_grpo_hold.main(args)
    from_records = (out / "summary.md").read_text()
    assert from_records == from_raw
    # start / peak / last-5 per seed: s1 40 / 80 / mean(80, 70, 65, 66, 64) = 69; s2 41 / 90 / mean(90, 55, 60, 62, 61) = 65.6
    assert "s1: 40.0 / 80.0 / 69.0; s2: 41.0 / 90.0 / 65.6" in from_records
    assert "python grpo_dt.py --seed 1" in from_records
