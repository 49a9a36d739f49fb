"""Where each script's lines go: header, Args, the shared blocks, the script's own code, and `main`.

Prints one markdown table (lines by part, `wc -l` total and the guide's limit), so a reader sees what a line limit
would have to remove. Blank lines count where they stand, as `wc -l` counts them.

    python benchmarks/line_budget.py
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"grpo_dt.py": 600, "grpo_dt_qguided.py": 600}  # the others: 500
SCRIPTS = ["grpo_dt.py", "grpo_dt_qguided.py", "ppo_dt.py", "odt_td3.py", "pretrain_dt.py", "iql.py", "grpo_dt_fast.py"]
START = re.compile(r"^\s*# ---- shared: ([\w-]+)")
END = re.compile(r"^\s*# ---- end shared: ([\w-]+) ----$")


def parts_of(source: str) -> dict[str, int]:
    """Lines per part; a shared block's lines go to `shared: NAME`, wherever it stands (Args holds two)."""
    spans = {n.name: (n.lineno, n.end_lineno) for n in ast.parse(source).body if hasattr(n, "name")}
    args, main = spans.get("Args", (0, -1)), spans.get("main", (0, -1))
    parts: dict[str, int] = {}
    block = None
    for i, line in enumerate(source.splitlines(), 1):
        if block is None and (m := START.match(line)):
            block = m.group(1)
        if block:
            name = f"shared: {block}"
        else:
            name = "Args" if args[0] <= i <= args[1] else "main" if i >= main[0] else "header" if i < args[0] else "own code"
        parts[name] = parts.get(name, 0) + 1
        if block and END.match(line):
            block = None
    return parts


def main():
    table = {s: parts_of((ROOT / s).read_text()) for s in SCRIPTS}
    shared = sorted({p for parts in table.values() for p in parts if p.startswith("shared")})
    cols = ["header", "Args", *shared, "own code", "main"]
    print("| script | " + " | ".join(c.replace("shared: ", "") for c in cols) + " | shared total | total | limit |")
    print("|---" * (len(cols) + 4) + "|")
    for script, parts in table.items():
        cells = [str(parts.get(c, "")) for c in cols]
        limit = LIMITS.get(script, 500)
        total, in_shared = sum(parts.values()), sum(v for k, v in parts.items() if k.startswith("shared"))
        print(f"| {script} | " + " | ".join(cells) + f" | {in_shared} | {total} | {limit} |")


if __name__ == "__main__":
    main()
