"""bars.png: the last-3 score of each CPU-scale DT and of the MLP reference, a dot per seed, against the data's 40.3.

python results/pretrain-cpu/plot.py   (from the repository root; reads logs/ only)
"""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
LOGS = HERE / "logs"
EVALUATION = re.compile(r"^update \d+: return [^\n]*normalized score (-?[\d.]+)$", re.M)
PER_SEED = re.compile(r"\(per seed \[([-\d. ]+)\]\)")
DATASET_SCORE = re.compile(r"mean return [\d.]+ \(normalized (-?[\d.]+)\)")


def last3_from_curve(path):
    """The 256×3 logs keep every evaluation; the README's "last 3" is the mean of the final three."""
    return float(np.mean([float(s) for s in EVALUATION.findall(path.read_text())][-3:]))


def last3_per_seed(path):
    """The other logs keep only the per-seed last-3 scores the benchmark printed."""
    return [float(s) for s in PER_SEED.search(path.read_text()).group(1).split()]


big_dt = sorted(LOGS.glob("dt_256x3_seed*.log"))
arms = {
    "DT 256×3, lr 1e-3,\n4000 updates": [last3_from_curve(p) for p in big_dt],
    "DT 128×2 (CPU preset),\nlr 1e-3, 3000 updates": last3_per_seed(LOGS / "bench_0533.log"),
    "DT 128×2, lr 3e-3,\n6000 updates": last3_per_seed(LOGS / "bench_lr3e-3_6k.log"),
    "MLP behaviour cloning\n(2×256, 10k updates)": last3_per_seed(LOGS / "bc_reference.log"),
}
dataset_score = float(DATASET_SCORE.search(big_dt[0].read_text()).group(1))

fig, ax = plt.subplots(figsize=(8, 4.8))
for x, scores in enumerate(arms.values()):
    ax.bar(x, np.mean(scores), color=f"C{x}", alpha=0.45)
    jitter = np.linspace(-0.08, 0.08, len(scores))  # two MLP seeds differ by 0.1 and would hide each other
    ax.scatter(x + jitter, scores, color=f"C{x}", edgecolor="black", zorder=3, s=28)
ax.scatter([], [], color="white", edgecolor="black", label="one seed")
ax.axhline(dataset_score, color="black", ls="--", lw=1, label=f"the dataset's own score, {dataset_score}")
labels = [f"{label}\nmean of {len(scores)} seeds: {np.mean(scores):.1f}" for label, scores in arms.items()]
ax.set_xticks(range(len(arms)), labels, fontsize=8)
ax.set_ylabel("normalized score (mean of the last 3 evaluations)")
ax.set_title("Pretraining at CPU scale on local/hopper/medium-v0 (bar = mean, dot = one seed)")
ax.grid(axis="y", alpha=0.3)
ax.legend(fontsize=8, loc="upper right")
fig.tight_layout()
fig.savefig(HERE / "bars.png", dpi=110)
