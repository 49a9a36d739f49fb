"""bars.png: today's default DT (censored likelihood) against ODT's density and MLP behaviour cloning, per dataset.

python results/dt-vs-bc/plot.py   (from the repository root; reads logs/ only)
"""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
LOGS = HERE / "logs"
DATASETS = {  # log name -> (panel title, the config that stands for "ODT's density" in the README's table)
    "local-hopper-medium-v0": ("local/hopper/medium-v0", "odt"),
    "local-door-human-v0": ("local/door/human-v0", "odt"),
    "generated-hopper-random-v0": ("generated/hopper/random-v0", "odt"),
    "generated-hopper-noisy-v0": ("generated/hopper/noisy-v0", "odt-remade"),  # ODT's density on the re-made noisy set
}
DT_SCORE = re.compile(r"update \d+: return [^\n]*?normalized score (-?[\d.]+)")
BC_SCORES = re.compile(r"^seed \d+: (.*)$", re.M)


def last3(scores):
    """The README's "last 3": the mean of a run's last three evaluations."""
    return float(np.mean(scores[-3:]))


def seeds(prefix):
    """Last-3 score per seed of the runs logs/<prefix>_s<seed>.log."""
    values = []
    for path in sorted(LOGS.glob(f"{prefix}_s*.log"), key=lambda p: int(p.stem.rpartition("_s")[2])):
        text = path.read_text(errors="replace")
        if prefix.startswith("bc_"):
            scores = [float(item.split(": ")[1]) for item in BC_SCORES.search(text).group(1).split(", ")]
        else:
            scores = [float(s) for s in DT_SCORE.findall(text)]
        values.append(last3(scores))
    return values


fig, axes = plt.subplots(1, len(DATASETS), figsize=(14, 4.2))
for ax, (name, (title, odt_config)) in zip(axes, DATASETS.items()):
    arms = {
        "DT, censored (default)": seeds(f"dt_censored099_{name}"),
        "DT, ODT's density": seeds(f"dt_{odt_config}_{name}"),
        "MLP behaviour cloning": seeds(f"bc_{name}"),
    }
    for x, (label, values) in enumerate(arms.items()):
        color = f"C{x}"
        ax.bar(x, np.mean(values), color=color, alpha=0.45, label=label)
        jitter = np.linspace(-0.15, 0.15, len(values))  # spread the seeds so equal scores stay visible
        ax.scatter(x + jitter, values, color=color, edgecolor="black", zorder=3, s=22)
    ax.set_xticks(range(len(arms)), [f"mean {np.mean(v):.1f}\n{len(v)} seeds" for v in arms.values()], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
axes[0].set_ylabel("normalized score (mean of last 3 evaluations)")
handles, labels = axes[0].get_legend_handles_labels()
fig.legend(handles, labels, loc="upper center", ncol=3, frameon=False, title="bar = mean over seeds, dot = one seed")
fig.tight_layout(rect=(0, 0, 1, 0.88))
fig.savefig(HERE / "bars.png", dpi=110)
