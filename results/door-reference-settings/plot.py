"""curves.png and the table of this folder: each reference-settings run beside its CPU row's seed 1 on Door.

python results/door-reference-settings/plot.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

HERE = Path(__file__).resolve().parent
ROWS = HERE.parents[0] / "table1-cpu-censored" / "records" / "door"
# (title, the CPU row's record, this folder's run name)
PAIRS = [
    ("ODT+TD3", "odt-td3__s1.json", "odt-td3-critic-pretrain-40000"),
    ("Q-guided GRPO-DT", "qguided__s1.json", "qguided-critic-batch-256"),
]
DT_SEED1 = 15.65  # the Door DT on seed 1's evaluation episodes


def curve_of_record(path: Path):
    s = json.loads(path.read_text())["scalars"]
    steps = dict(zip(*s["charts/env_steps"][:2])) | {0: 0.0}
    its, score = s["charts/normalized_score"][:2]
    return np.array([steps[i] for i in its]), np.array(score)


def curve_of_run(name: str):
    """A run's (env steps, score), kept in records/NAME.json from its TensorBoard log (raw/ is not committed)."""
    kept, runs = HERE / "records" / f"{name}.json", sorted((HERE / "raw" / "runs").glob(f"*__{name}__*"))
    if runs:
        ea = EventAccumulator(str(runs[-1])).Reload()
        score = {e.step: e.value for e in ea.Scalars("charts/normalized_score")}
        steps = {e.step: e.value for e in ea.Scalars("charts/env_steps")} | {0: 0.0}
        its = sorted(set(score) & set(steps))
        kept.parent.mkdir(exist_ok=True)
        kept.write_text(json.dumps({"env_steps": [steps[i] for i in its], "normalized_score": [score[i] for i in its]}))
    if not kept.exists():
        return None
    k = json.loads(kept.read_text())
    return np.array(k["env_steps"]), np.array(k["normalized_score"])


def late(y):
    return float(np.mean(y[-max(1, len(y) // 4) :]))


fig, axes = plt.subplots(1, len(PAIRS), figsize=(6 * len(PAIRS), 4))
print("| method | run | env steps | final | last 25% |\n|---|---|---|---|---|")
for ax, (title, record, name) in zip(axes, PAIRS):
    for label, curve in (("CPU row (seed 1)", curve_of_record(ROWS / record)), (name, curve_of_run(name))):
        if curve is None:
            print(f"| {title} | {label} | not run | | |")
            continue
        x, y = curve
        ax.plot(x, y, label=label)
        print(f"| {title} | {label} | {int(x[-1]):,} | {y[-1]:.2f} | {late(y):.2f} |")
    ax.axhline(DT_SEED1, ls="--", c="grey", label="DT (seed 1's episodes)")
    ax.set(title=f"Door: {title}", xlabel="env steps", ylabel="normalized score")
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(HERE / "curves.png", dpi=120)
