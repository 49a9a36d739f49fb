"""One pretraining run of an arm of the recipe experiment (PREREG.md), on the code of pretrain_dt.py in REPO.

    python results/pretrain-recipe/run_arm.py REPO ARM DATASET SEED OUT_DIR

A0 runs pretrain_dt.py as it is; A1 and A2 replace its learning-rate schedule by warm-up then a half cosine to 0.
"""

import glob
import json
import math
import sys
import time

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

repo, arm, dataset, seed, out = sys.argv[1:6]
sys.path.insert(0, repo)
import pretrain_dt  # noqa: E402

ENV = {"local/hopper/medium-v0": "Hopper-v4", "local/door/human-v0": "AdroitHandDoor-v1"}[dataset]
ARMS = {"A0": dict(), "A1": dict(), "A2": dict(warmup_updates=600, batch_size=64, learning_rate=5e-4)}
flags = dict(env_id=ENV, dataset=dataset, seed=int(seed), eval_every=250, eval_episodes=20, save_every=0)
flags["checkpoint"] = f"{out}/{arm}_{dataset.split('/')[1]}_s{seed}.pt"
flags["runs_dir"] = f"{out}/runs/{arm}_{dataset.split('/')[1]}_s{seed}"
size_field = "scale" if "scale" in pretrain_dt.Args.__dataclass_fields__ else "model_size"
args = pretrain_dt.Args(**flags, **{size_field: "cpu"}, **ARMS[arm])

if arm != "A0":
    real = torch.optim.lr_scheduler.LambdaLR
    full = pretrain_dt.apply_presets(args)

    def cosine(optimizer, _lambda):
        w, n = full.warmup_updates, full.num_updates
        return real(optimizer, lambda u: (u + 1) / w if u + 1 < w else 0.5 * (1 + math.cos(math.pi * (u + 1 - w) / (n - w))))

    pretrain_dt.torch.optim.lr_scheduler.LambdaLR = cosine

start = time.time()
pretrain_dt.main(args)
wall = time.time() - start

(run,) = glob.glob(f"{flags['runs_dir']}/*/")
acc = EventAccumulator(run, size_guidance={"scalars": 0})
acc.Reload()
evals = {e.step: e.value for e in acc.Scalars("charts/normalized_score")}
rec = dict(arm=arm, dataset=dataset, seed=int(seed), wall_s=wall, evals=evals)
json.dump(rec, open(f"{out}/{arm}_{dataset.split('/')[1]}_s{seed}.json", "w"))
print(json.dumps(rec))
