"""Every scalar both versions logged, before (x) against after (y), one panel per script: on the diagonal means equal.

python results/reshape-check/plot.py      # from the repository root; writes identity.png here
"""

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
before, after = (json.loads((HERE / "records" / f"{name}.json").read_text()) for name in ("before", "after"))
scripts = sorted(set(before) & set(after))
fig, axes = plt.subplots(1, len(scripts), figsize=(3.2 * len(scripts), 3.4))
for ax, script in zip(axes, scripts):
    pairs = []
    for tag in sorted(set(before[script]) & set(after[script])):
        b, a = before[script][tag], after[script][tag]
        # pair the values in step order: a tag whose steps moved by a constant offset (IQL's offline/*) still pairs
        pairs += [(b[x], a[y]) for x, y in zip(sorted(b, key=int), sorted(a, key=int))]
    x, y = np.array(pairs).T
    # a symmetric log scale shows values from -1e3 to 1e4 and their signs on one axis
    ax.set(xscale="symlog", yscale="symlog", title=f"{script}\n{len(pairs)} values, {int((x != y).sum())} differ")
    lim = np.abs(np.concatenate([x, y])).max() * 2
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, zorder=0)
    ax.scatter(x, y, s=8)
    ax.set_xlabel("before the reshape")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("after the reshape")
fig.tight_layout()
fig.savefig(HERE / "identity.png", dpi=100)
