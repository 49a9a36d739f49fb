#!/bin/bash
# Issue #15 device check 4: members dealt to workers (i % workers) with CUDA-graph policy steps: scaling 1-16 workers,
# 16 workers with 1 and 4 stages; paper-scale GRPO-DT iterations from the 2000-update paper-size DT (30.2 last time).
START=$(date +%s)
left() { echo $(( ${1:-420} - ($(date +%s) - START) )); }
stamp() { echo "=== $1 at $(( $(date +%s) - START )) s"; }
clean() { grep -v -i "warn\|deprecation" | tr "\r" "\n" | grep -v -E "^(pretrain|grpo-dt):|^\s*$"; }
export PYTHONUNBUFFERED=1 MINARI_DATASETS_PATH=$PWD/.device/datasets OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
B="python3 benchmarks/bench_grpo_dt.py throughput --checkpoint .device/cpu_censored_s1.pt --trajs-per-iter 16 --eval-len 400 --device cuda --repeats 2"
stamp throughput
timeout $(left 100) $B --workers 16 8 4 2 1 2>&1 | grep -v -i "warn\|deprecat" | tee $OUT/throughput_dealt.log
for st in 1 4; do
  stamp "throughput stages $st"
  timeout $(left $([ $st = 1 ] && echo 125 || echo 150)) $B --workers 16 --stages $st 2>&1 | grep -v -i "warn\|deprecat" | tee $OUT/throughput_dealt_stages$st.log
done
stamp pretrain
timeout $(left 290) python3 pretrain_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --model-size paper --seed 1 --num-updates 2000 --eval-every 1000 --checkpoint .device/paper_s1_2k.pt --runs-dir /tmp/runs 2>&1 | clean | tee $OUT/pretrain4.log
stamp "grpo defaults"
timeout $(left 420) python3 grpo_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --checkpoint .device/paper_s1_2k.pt --num-workers 16 --num-iterations 12 --save-every 0 --runs-dir /tmp/runs 2>&1 | clean | tee $OUT/grpo4_paper.log
stamp end
