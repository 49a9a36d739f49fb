"""The code the scripts share is copied, CleanRL-style, and fenced by marker comments; the copies must never drift.

Each fenced block (`# ---- shared: NAME ...` to `# ---- end shared: NAME ----`) must be byte-identical, markers
included, in every script that should have it.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DT_SCRIPTS = ["pretrain_dt.py", "grpo_dt.py", "grpo_dt_qguided.py", "ppo_dt.py", "odt_td3.py"]
FINETUNING_DT = DT_SCRIPTS[1:]
EXPECTED = {
    "args-header": DT_SCRIPTS + ["iql.py"],
    "common": DT_SCRIPTS + ["iql.py"],
    "model": DT_SCRIPTS,
    "checkpoint": DT_SCRIPTS,
    "resume": FINETUNING_DT + ["iql.py"],
    "load-checkpoint": FINETUNING_DT,
    "datasets": ["pretrain_dt.py", "iql.py"],
    "finetune-args": FINETUNING_DT,
    "reinformer": ["pretrain_dt.py", "grpo_dt.py"],
}
BLOCK = re.compile(r"^[ \t]*# ---- shared: ([\w-]+).*?^[ \t]*# ---- end shared: \1 ----$", re.M | re.S)


def blocks_of(script: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for m in BLOCK.finditer((ROOT / script).read_text()):
        found.setdefault(m.group(1), []).append(m.group(0))
    return found


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_block_is_identical_in_every_script_that_shares_it(name):
    texts = {script: blocks_of(script).get(name, []) for script in EXPECTED[name]}
    missing = [s for s, t in texts.items() if len(t) != 1]
    assert not missing, f"block {name!r} must appear exactly once in {missing}"
    reference_script, (reference,) = next(iter(texts.items()))
    for script, (text,) in texts.items():
        assert text == reference, f"block {name!r} in {script} differs from {reference_script}"


def test_no_unexpected_blocks():
    for script in sorted({s for scripts in EXPECTED.values() for s in scripts}):
        names = set(blocks_of(script))
        assert names <= {n for n, scripts in EXPECTED.items() if script in scripts}, f"{script}: {sorted(names)}"


def test_line_budget_counts_every_line_once():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from line_budget import SCRIPTS, parts_of

    for script in SCRIPTS:
        source = (ROOT / script).read_text()
        parts = parts_of(source)
        assert sum(parts.values()) == len(source.splitlines()), script
        assert {"header", "Args", "own code", "main"} <= set(parts), script
