#!/bin/bash
# GRPO-DT's paper-scale Hopper rows of Table 1, in one command on a GPU machine:
#   1. Table 5's 4x512 DT on local/hopper/medium-v0 (pretrain_dt.py --scale paper: 5000 updates, a checkpoint every
#      1000, so a pretraining cut by the time limit leaves its last one, and the log says at which update);
#   2. grpo_dt_fast.py from that DT, two runs side by side, seed 1: the paper's settings, and the CPU preset's GRPO-DT
#      settings (--narrow-exploration --gamma 1.0), each with half the cores as env workers, until the time left runs out.
# Everything a run writes (logs, TensorBoard with every iteration's score, the DT) goes to $OUT. The argument is the
# seconds the whole command may take. Copy the dataset beside the code first, then run it on the GPU machine:
#   mkdir -p .device/datasets/local && cp -r ../shared/datasets/local/hopper .device/datasets/local/
#   OUT=/path/to/out bash benchmarks/paper_scale_hopper.sh 560
# .device/wheels/*.whl, if present, is installed first (the packages that machine lacks, for its Python).
# Check it here first, tiny and on the CPU: SMOKE=1 OUT=/tmp/out bash benchmarks/paper_scale_hopper.sh 400
set -u
BUDGET=${1:-560}
START=$(date +%s)
left() { local t=$((BUDGET - $(date +%s) + START - ${1:-0})); echo $((t > 1 ? t : 1)); }
stamp() { echo "=== $1 at $(($(date +%s) - START)) s"; }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
export MINARI_DATASETS_PATH=${MINARI_DATASETS_PATH:-$PWD/.device/datasets}
OUT=${OUT:?set OUT to the folder the results go to}
if compgen -G ".device/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv 2>/dev/null
python3 -c "import torch, mujoco, gymnasium, minari; print(torch.__version__, torch.cuda.is_available(), mujoco.__version__, gymnasium.__version__, minari.__version__)"
DATA="--env-id Hopper-v4 --dataset local/hopper/medium-v0"
CKPT=$OUT/dt_paper_s1.pt
if [ "${SMOKE:-0}" = 1 ]; then  # the same commands, tiny: a 2-layer DT, short episodes, one iteration per arm
  PRE="--num-updates 20 --warmup-updates 2 --save-every 10 --eval-every 10 --eval-episodes 1 --embed-dim 32 --n-layers 1 --n-heads 1"
  GRPO="--num-iterations 1 --eval-episodes 1 --max-episode-steps 30 --trajs-per-iter 2 --reset-points 1 --group-size 2 --eval-len 5 --n-batch 4 --updates-per-iter 1"
  WORKERS=1
else
  PRE="" GRPO="--num-iterations 1000" WORKERS=$(($(nproc) / 2))
fi
stamp "pretrain (Table 5's DT)"
# leave at least 300 s for finetuning; the last checkpoint written before the cut is the one finetuned
timeout $(left 300) python3 pretrain_dt.py $DATA --scale paper --seed 1 --checkpoint $CKPT --runs-dir $OUT/runs $PRE \
  2>&1 | tr "\r" "\n" | grep -v -E "^\s*$|it/s\]$" | tee $OUT/pretrain.log
[ -f $CKPT ] || { echo "no checkpoint was written"; exit 1; }
stamp "grpo_dt_fast.py, paper settings and CPU preset, $WORKERS workers each"
for arm in paper narrow; do
  flags=""; [ $arm = narrow ] && flags="--narrow-exploration --gamma 1.0"
  timeout $(left 10) python3 grpo_dt_fast.py $DATA --scale paper --seed 1 --checkpoint $CKPT --num-workers $WORKERS \
    --max-seconds $(left 40) --save-every 0 --runs-dir $OUT/runs/$arm $GRPO $flags \
    2>&1 | tr "\r" "\n" | grep -v -E "^\s*$" > $OUT/grpo_$arm.log &
done
wait
stamp end
tail -n 3 $OUT/grpo_*.log
