"""Table and curves of the recipe experiment from records/*.json (written by run_arm.py)."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).parent
runs = [json.loads(p.read_text()) for p in sorted((HERE / "records").glob("*.json"))]
arms, datasets = sorted({r["arm"] for r in runs}), sorted({r["dataset"] for r in runs})
print("| dataset | arm | seeds | final per seed | mean final | std final | last-3 range per seed | mean range | wall s |")
print("|---|---|---|---|---|---|---|---|---|")
fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4))
for ax, ds in zip(axes, datasets):
    for arm, color in zip(arms, ("tab:gray", "tab:blue", "tab:orange")):
        rs = sorted((r for r in runs if r["arm"] == arm and r["dataset"] == ds), key=lambda r: r["seed"])
        if not rs:
            continue
        steps = sorted(map(int, rs[0]["evals"]))
        curves = np.array([[r["evals"][str(s)] for s in steps] for r in rs])
        final, last3 = curves[:, -1], curves[:, -3:]
        ranges = last3.max(1) - last3.min(1)
        std = final.std(ddof=1) if len(rs) > 1 else float("nan")
        fmt = ", ".join
        print(
            f"| {ds} | {arm} | {len(rs)} | {fmt(f'{x:.1f}' for x in final)} | {final.mean():.1f} | {std:.1f} | "
            f"{fmt(f'{x:.1f}' for x in ranges)} | {ranges.mean():.1f} | {np.mean([r['wall_s'] for r in rs]):.0f} |"
        )
        for c in curves:
            ax.plot(steps, c, color=color, alpha=0.35, lw=1)
        ax.plot(steps, curves.mean(0), color=color, lw=2, label=f"{arm} (mean of {len(rs)})")
    ax.set(title=ds, xlabel="pretraining update", ylabel="normalized score (20 episodes)")
    ax.legend()
fig.tight_layout()
fig.savefig(HERE / "curves.png", dpi=110)
