"""curves.png: offline IQL's score against offline updates, per budget (left) and per τ/β arm (right), and the data's 40.3.

python results/iql-offline-hopper/plot.py   (from the repository root; reads logs/ only)
"""

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
LOGS = HERE / "logs"
BUDGETS = {"offline5000": "5k updates", "offline25000": "25k updates", "offline100000": "100k updates"}
ARMS = {".": "defaults (τ 0.7, β 3)", "beta10": "β 10", "expectile09": "expectile 0.9", "beta1": "β 1"}
DURING = re.compile(r"offline step (\d+): return [\d.]+, normalized score (-?[\d.]+)")
FINAL = re.compile(r": 0 online env steps, (\d+) updates, normalized score (-?[\d.]+)")
TARGET = re.compile(r"target (-?[\d.]+)")


def run_curve(path):
    """Offline updates -> score of one offline-only run: the evaluations during training, then the final one."""
    record = path.with_suffix(".json")
    if record.exists():  # the later runs also kept their scores unrounded, which the README's means use
        return {int(u): float(s) for u, s in json.loads(record.read_text())["curve"].items()}
    text = path.read_text(errors="replace")
    points = {int(u): float(s) for u, s in DURING.findall(text)}
    points.update({int(u): float(s) for u, s in FINAL.findall(text)})
    return points


def draw(ax, folder, prefix, label, color, marker="o"):
    """Thin line per seed, thick line through the mean over seeds at each evaluation."""
    runs = [run_curve(p) for p in sorted((LOGS / folder).glob(f"{prefix}_online0_s*.log"))]
    for points in runs:
        ax.plot(sorted(points), [points[u] for u in sorted(points)], color=color, lw=0.8, alpha=0.35, marker=".")
    updates = sorted(set.intersection(*(set(points) for points in runs)))
    mean = [np.mean([points[u] for points in runs]) for u in updates]
    label = f"{label}, {len(runs)} seeds (final mean {mean[-1]:.2f})"
    ax.plot(updates, mean, color=color, lw=2.2, marker=marker, ms=7, label=label)


target = float(TARGET.search((LOGS / "bench_offline.log").read_text()).group(1))
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
# the 5k runs' only point sits under the 25k runs' first evaluation, so the budgets differ by marker too
for color, ((prefix, label), marker) in enumerate(zip(BUDGETS.items(), "D^o")):
    draw(left, ".", prefix, label, f"C{color}", marker)
for color, (folder, label) in enumerate(ARMS.items(), start=len(BUDGETS)):
    draw(right, folder, "offline10000", label, f"C{color}")
left.set_xscale("log")  # budgets span 5k to 100k updates
left.set_title("Budgets, default τ and β")
right.set_title("τ and β, 10k updates")
left.set_ylabel("normalized score (20 evaluation episodes)")
for ax in (left, right):
    ax.axhline(target, color="black", ls="--", lw=1, label=f"the dataset's own score, {target}")
    ax.set_xlabel("offline updates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.suptitle("Offline IQL on local/hopper/medium-v0 (thin: one seed, thick: mean over seeds)")
fig.tight_layout()
fig.savefig(HERE / "curves.png", dpi=110)
