#!/bin/bash
# Issue #15 device checks: rollout scaling (N = 1..16 workers, policy on cuda) and paper-scale GRPO-DT iteration time.
START=$(date +%s)
left() { echo $(( ${1:-545} - ($(date +%s) - START) )); }
stamp() { echo "=== $1 at $(( $(date +%s) - START )) s"; }
export PYTHONUNBUFFERED=1 MINARI_DATASETS_PATH=$PWD/.device/datasets OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv; nproc; lscpu | grep -E "Model name|^CPU\(s\)|Thread"
python3 -c "import torch, mujoco, gymnasium, minari, tyro; print(torch.__version__, torch.cuda.is_available(), mujoco.__version__, gymnasium.__version__, minari.__version__)"
stamp throughput
timeout $(left 230) python3 benchmarks/bench_grpo_dt.py throughput --checkpoint .device/cpu_censored_s1.pt --trajs-per-iter 16 --eval-len 400 --workers 1 2 4 8 16 --device cuda --repeats 2 2>&1 | grep -v -i "warn\|deprecation" | tee $OUT/throughput.log
stamp throughput-per-worker-stages
timeout $(left 250) python3 benchmarks/bench_grpo_dt.py throughput --checkpoint .device/cpu_censored_s1.pt --trajs-per-iter 16 --eval-len 400 --workers 16 --stages 0 --device cuda --repeats 1 2>&1 | grep -v -i "warn\|deprecation" | tee $OUT/throughput_stages0.log
stamp pretrain
timeout $(left 390) python3 pretrain_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --model-size paper --seed 1 --num-updates 2000 --eval-every 1000 --save-every 500 --checkpoint .device/paper_s1.pt --runs-dir /tmp/runs 2>&1 | grep -v -i "warn\|deprecation" | tr "\r" "\n" | grep -v -E "^(pretrain|grpo-dt):|^\s*$" | tee $OUT/pretrain.log
ls -la .device/
CKPT=.device/paper_s1.pt; [ -f $CKPT ] || CKPT=.device/cpu_censored_s1.pt
stamp grpo-paper-scale-$CKPT
timeout $(left 560) python3 grpo_dt.py --env-id Hopper-v4 --dataset local/hopper/medium-v0 --checkpoint $CKPT --num-workers 16 --num-iterations 100 --max-seconds $(left 520) --save-every 0 --runs-dir /tmp/runs 2>&1 | grep -v -i "warn\|deprecation" | tr "\r" "\n" | grep -v -E "^(pretrain|grpo-dt):|^\s*$" | tee $OUT/grpo_paper.log
stamp end
