#!/bin/bash
# Issue #15 device check 3: CUDA-graph policy steps (grpo_dt --cuda-graphs): exactness and latency, scaling 1-16
# workers, paper-scale GRPO-DT iterations with graphs on and off from the same paper-size DT.
START=$(date +%s)
left() { echo $(( ${1:-500} - ($(date +%s) - START) )); }
stamp() { echo "=== $1 at $(( $(date +%s) - START )) s"; }
clean() { grep -v -i "warn\|deprecation" | tr "\r" "\n" | grep -v -E "^(pretrain|grpo-dt):|^\s*$"; }
export PYTHONUNBUFFERED=1 MINARI_DATASETS_PATH=$PWD/.device/datasets OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch; print(torch.__version__)"
stamp check
timeout $(left 110) python3 .device/check_graphs.py 2>&1 | grep -v -i "warn\|deprecat" | tee $OUT/check_graphs.log
grep -q "CHECK graph == eager whole-stage: True" $OUT/check_graphs.log || { stamp "check failed, stopping"; exit 1; }
stamp throughput
timeout $(left 250) python3 benchmarks/bench_grpo_dt.py throughput --checkpoint .device/cpu_censored_s1.pt --trajs-per-iter 16 --eval-len 400 --workers 16 8 4 2 1 --device cuda --repeats 2 2>&1 | grep -v -i "warn\|deprecat" | tee $OUT/throughput_graphs.log
stamp pretrain
timeout $(left 330) python3 pretrain_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --model-size paper --seed 1 --num-updates 1000 --eval-every 1000 --checkpoint .device/paper_s1.pt --runs-dir /tmp/runs 2>&1 | clean | tee $OUT/pretrain3.log
for g in --cuda-graphs --no-cuda-graphs; do
  stamp "grpo $g"
  timeout $(left $([ $g = --cuda-graphs ] && echo 420 || echo 500)) python3 grpo_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --checkpoint .device/paper_s1.pt --num-workers 16 --num-iterations 3 --save-every 0 --runs-dir /tmp/runs $g 2>&1 | clean | tee $OUT/grpo3$g.log
done
stamp end
