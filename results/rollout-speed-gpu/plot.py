"""scaling.png: GRPO-DT rollout throughput and efficiency (fraction of raw MuJoCo speed per core) against env workers.

python results/rollout-speed-gpu/plot.py   (from the repository root; reads the throughput*.log files only)
"""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
SWEEPS = {  # log -> legend label; each log sweeps the number of workers
    "throughput.log": "before CUDA graphs (run 1)",
    "throughput_graphs_contiguous.log": "CUDA graphs, members in contiguous slices (run 3)",
    "throughput_dealt.log": "CUDA graphs, members dealt (run 4)",
}
SINGLES = {  # log -> (legend label, marker); one 16-worker run each, a different number of pipeline stages
    "throughput_stages0.log": ("one stage per worker (run 1)", "x"),
    "throughput_dealt_stages1.log": ("members dealt, 1 stage (run 4)", "v"),
    "throughput_dealt_stages4.log": ("members dealt, 4 stages (run 4)", "^"),
}
LINE = re.compile(r"^workers (\d+): ([\d,]+) env-steps/s, .*?-> ([\d.]+)x raw per core = efficiency(.*)$", re.M)
TARGET = re.compile(r"target ([\d.]+)")


def read(name):
    """Rows of (workers, env-steps/s, efficiency, target or None), sorted by workers."""
    rows = []
    for workers, rate, efficiency, rest in LINE.findall((HERE / name).read_text()):
        target = TARGET.search(rest)  # only the worker counts that had a target print one
        target = float(target.group(1)) if target else None
        rows.append((int(workers), float(rate.replace(",", "")), float(efficiency), target))
    return sorted(rows)


fig, (speed, share) = plt.subplots(1, 2, figsize=(13, 4.8))
targets = {}
for name, label in SWEEPS.items():
    rows = read(name)
    workers, rates, efficiencies, _ = zip(*rows)
    speed.plot(workers, rates, marker="o", label=label)
    share.plot(workers, efficiencies, marker="o", label=label)
    targets.update({w: t for w, _, _, t in rows if t is not None})
for name, (label, marker) in SINGLES.items():
    ((workers, rate, efficiency, _),) = read(name)
    speed.scatter(workers, rate, marker=marker, s=60, color="gray", zorder=3, label=label)
    share.scatter(workers, efficiency, marker=marker, s=60, color="gray", zorder=3, label=label)
share.scatter(
    list(targets), list(targets.values()), marker="*", s=200, color="gold", edgecolor="black", zorder=4, label="target"
)
for ax in (speed, share):
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    ax.set_xlabel("env worker processes (policy on the GPU)")
    ax.grid(alpha=0.3)
speed.set_ylabel("rollout throughput (env steps / s)")
speed.set_title("Throughput (runs 3 and 4 had machines of different raw speed)")
share.set_ylabel("efficiency (fraction of raw mj_step speed per core)")
share.set_title("Efficiency: comparable across machines")
share.set_ylim(0, 1)
share.legend(fontsize=8, loc="lower left")  # the lower left is the one empty corner
fig.suptitle("GRPO-DT group rollouts, 512 members, 128×2 DT, 16 CPU cores + one H200 (each point: median of its repeats)")
fig.tight_layout()
fig.savefig(HERE / "scaling.png", dpi=110)
