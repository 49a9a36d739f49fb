"""Compare two scalars.json records: every tag both logged must hold the same values at the same steps, exactly."""

import json
import sys

before, after = (json.load(open(p)) for p in sys.argv[1:3])
bad = 0


def shifted(b: dict, a: dict) -> bool:
    """The same values in the same order at steps moved by one constant (a logging offset changed on purpose)."""
    sb, sa = sorted(b, key=int), sorted(a, key=int)
    offsets = {int(y) - int(x) for x, y in zip(sb, sa)}
    return len(sb) == len(sa) and len(offsets) == 1 and [b[k] for k in sb] == [a[k] for k in sa]


for script in sorted(set(before) & set(after)):
    b, a = before[script], after.get(script, {})
    shared = sorted(set(b) & set(a))
    diff = [t for t in shared if b[t] != a[t] and not shifted(b[t], a[t])]
    for t in shared:
        if b[t] != a[t] and shifted(b[t], a[t]):
            print(f"  {t}: the same values, every step shifted by {int(min(a[t], key=int)) - int(min(b[t], key=int))}")
    bad += len(diff) + (not shared)
    dropped, new = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    print(f"{script}: {len(shared)} tags compared, {len(diff)} differ; dropped {dropped}; new {new}")
    for t in diff:
        print(f"  {t}: before {b[t]} after {a[t]}")
sys.exit(1 if bad else 0)
