"""Every scalar under RUNS_DIR/<script>/<run>/ as JSON {script: {tag: {step: value}}}, wall-clock figures left out."""

import json
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TIMED = ("SPS", "seconds", "per_s", "time")
out = {}
for script_dir in sorted(Path(sys.argv[1]).iterdir()):
    tags = out.setdefault(script_dir.name, {})
    for run in sorted(p for p in script_dir.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if not any(t in tag for t in TIMED):
                tags.setdefault(tag, {}).update({str(e.step): e.value for e in acc.Scalars(tag)})
print(json.dumps(out, indent=1, sort_keys=True))
