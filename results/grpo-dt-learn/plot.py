"""curves.png: GRPO-DT's evaluation score per iteration in each of the three long CPU runs (one seed each).

python results/grpo-dt-learn/plot.py   (from the repository root; reads logs/ only)
"""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = {  # log -> legend label
    "learn.log": "L_eval 100, 1200 s",
    "learn_leval400.log": "L_eval 400, 4 trajectories/iteration, 960 s",
    "learn_kappalr.log": "κ falling 0.2 → 0.02",
}
START = re.compile(r"iteration 0: eval return [\d.]+, normalized score (-?[\d.]+)")
ITERATION = re.compile(r"iteration (\d+): score (-?[\d.]+) ")


def curve(path):
    """Iterations and scores of one run; iteration 0 is the pretrained DT before any update."""
    text = path.read_text(errors="replace")
    found = ITERATION.findall(text)
    iterations = [0] + [int(i) for i, _ in found]
    return iterations, [float(START.search(text).group(1))] + [float(s) for _, s in found]


curves = {label: curve(HERE / "logs" / name) for name, label in RUNS.items()}
fig, ax = plt.subplots(figsize=(8, 5))
for label, (iterations, scores) in curves.items():
    ax.plot(iterations, scores, marker=".", markersize=4, lw=1.2, label=f"{label} (last {scores[-1]:.1f})")
# every run starts from the same checkpoint, so one line marks where they all began
start = next(iter(curves.values()))[1][0]
ax.axhline(start, color="gray", ls="--", lw=1, label=f"pretrained DT (iteration 0): {start:.1f}")
ax.set_xlabel("GRPO-DT iteration")
ax.set_ylabel("normalized score (Hopper, 10 evaluation episodes)")
ax.set_title("GRPO-DT from the 128×2 CPU DT on local/hopper/medium-v0, one seed per run")
ax.grid(alpha=0.3)
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
fig.tight_layout()
fig.savefig(HERE / "curves.png", dpi=110)
