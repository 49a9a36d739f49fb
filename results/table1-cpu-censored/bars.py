"""bars.png of this folder from its kept records, with compare.py's plot_bars (the runs predate the picture).

python results/table1-cpu-censored/bars.py
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
import compare  # noqa: E402

METHODS = ("dt", "iql", "odt", "odt-td3", "ppo-dt", "grpo-dt", "qguided")  # the rows these runs had
sections = {}
for task in ("hopper", "door"):
    sections[task] = {}
    for m in (m for key in METHODS for m in compare.TABLE1 if m.key == key):
        runs = []
        for path in sorted((HERE / "records" / task).glob(f"{m.key}__s*.json")):
            run = compare.Run(task, m, int(path.stem.rpartition("__s")[2]))
            compare.load_kept(run, path)
            runs.append(run)
        sections[task][m.key] = runs
compare.plot_bars(sections, HERE / "bars.png", "Table 1 at CPU scale (1200 s per run, every DT method at context 1)")
