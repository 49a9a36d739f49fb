#!/bin/bash
# Issue #15 device check 2: the policy step's per-call latency on the GPU, and paper-scale GRPO-DT iterations with
# deterministic algorithms on (the default) and off, from the same paper-size DT.
START=$(date +%s)
left() { echo $(( ${1:-265} - ($(date +%s) - START) )); }
stamp() { echo "=== $1 at $(( $(date +%s) - START )) s"; }
export PYTHONUNBUFFERED=1 MINARI_DATASETS_PATH=$PWD/.device/datasets OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
stamp act-latency
timeout $(left 60) python3 .device/act_latency.py cuda 2>&1 | grep -v -i "warn" | tee $OUT/act_latency.log
stamp pretrain
timeout $(left 130) python3 pretrain_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --model-size paper --seed 1 --num-updates 1000 --eval-every 1000 --save-every 500 --checkpoint .device/paper_s1.pt --runs-dir /tmp/runs 2>&1 | grep -v -i "warn\|deprecation" | tr "\r" "\n" | grep -v -E "^(pretrain|grpo-dt):|^\s*$" | tee $OUT/pretrain2.log
for det in --torch-deterministic --no-torch-deterministic; do
  stamp "grpo $det"
  timeout $(left $([ $det = --torch-deterministic ] && echo 200 || echo 268)) python3 grpo_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --checkpoint .device/paper_s1.pt --num-workers 16 --num-iterations 3 --save-every 0 --runs-dir /tmp/runs $det 2>&1 | grep -v -i "warn\|deprecation" | tr "\r" "\n" | grep -v -E "^(pretrain|grpo-dt):|^\s*$" | tee $OUT/grpo2$det.log
done
stamp end
