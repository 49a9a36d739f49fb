#!/usr/bin/env bash
# Short seeded CPU runs of every script at toy sizes; their logged scalars go to $OUT/scalars.json.
# Usage: results/reshape-check/record.sh REPO_DIR OUT_DIR [GRPO_EXTRA_FLAGS...]
# Needs MINARI_DATASETS_PATH pointing at a root with local/hopper/medium-v0.
set -euo pipefail
HERE=$(dirname "$(realpath "$0")"); REPO=$(realpath "$1"); OUT=$(realpath -m "$2"); shift 2
GRPO_EXTRA=("$@")
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"; cd "$REPO"
H=(--env-id Hopper-v4 --dataset local/hopper/medium-v0 --seed 1)
python pretrain_dt.py "${H[@]}" --checkpoint "$OUT/hopper.pt" --runs-dir "$OUT/runs/pretrain_dt" \
  --num-updates 40 --batch-size 16 --embed-dim 32 --n-layers 1 --n-heads 2 --warmup-updates 5 \
  --eval-every 20 --eval-episodes 2 --save-every 0
FT=(--checkpoint "$OUT/hopper.pt" --num-iterations 2 --eval-episodes 2 --max-episode-steps 40 --save-every 0)
python grpo_dt.py "${H[@]}" "${FT[@]}" --runs-dir "$OUT/runs/grpo_dt" --n-batch 8 --trajs-per-iter 2 --reset-points 2 \
  --group-size 2 --subtraj-len 3 --eval-len 5 --updates-per-iter 2 --delta-r 0 "${GRPO_EXTRA[@]}"
python grpo_dt_qguided.py "${H[@]}" "${FT[@]}" --runs-dir "$OUT/runs/grpo_dt_qguided" --n-batch 8 --group-size 4 \
  --critic-updates 4 --critic-warmup-updates 4 --critic-pretrain-updates 4 --replay-size 8 --critic-batch-size 32 \
  --updates-per-iter 2
python ppo_dt.py "${H[@]}" "${FT[@]}" --runs-dir "$OUT/runs/ppo_dt" --k-ppo 2 --n-batch 8 --updates-per-iter 3 \
  --value-hidden 32
python odt_td3.py "${H[@]}" "${FT[@]}" --runs-dir "$OUT/runs/odt_td3" --actor-updates 3 --critic-updates 3 --n-batch 8 \
  --critic-pretrain-updates 3 --replay-size 40 --min-steps-per-iter 0
python iql.py "${H[@]}" --runs-dir "$OUT/runs/iql" --hidden-dim 16 --batch-size 16 --offline-updates 200 --eval-episodes 2 \
  --max-episode-steps 15 --eval-every 100 --online-steps 250 --save-every 0
python "$HERE/dump_scalars.py" "$OUT/runs" > "$OUT/scalars.json"
