#!/usr/bin/env bash
# The bad inputs a new user tried, each answered in one line with nothing run. Usage: results/first-hour/probes.sh
# (from the repository root; needs a datasets root only for the quick-start line at the end, which it skips without one).
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
printf 'not a checkpoint\n' > "$tmp/text.pt"; : > "$tmp/empty.pt"; head -c 100 /dev/urandom > "$tmp/truncated.pt"
probe() {  # the command, its exit code, the number of lines it printed to stderr, the last of them
  out=$("$@" --runs-dir "$tmp/runs" 2>&1 >/dev/null); code=$?
  printf '$ %s\n  exit %s, %s line(s): %s\n' "$*" "$code" "$(printf '%s' "$out" | grep -c '')" "$(printf '%s' "$out" | tail -1)"
}
probe python grpo_dt.py --learning-rate -1
probe python grpo_dt.py --eval-episodes 0
probe python grpo_dt.py --num-iterations -1
probe python grpo_dt.py --group-size 0
probe python grpo_dt.py --checkpoint ../nonexistent.pt
probe python grpo_dt.py --checkpoint "$tmp/text.pt"
probe python grpo_dt.py --checkpoint "$tmp/empty.pt"
probe python grpo_dt.py --checkpoint "$tmp/truncated.pt"
probe python grpo_dt.py --resume "$tmp/text.pt"
probe python grpo_dt.py --env-id Humanoid-v4
probe python pretrain_dt.py --batch-size 0
probe python pretrain_dt.py --dataset nonexistent
probe python ppo_dt.py --checkpoint ../nonexistent.pt
probe python odt_td3.py --checkpoint ../nonexistent.pt
probe python grpo_dt_qguided.py --checkpoint ../nonexistent.pt
probe python grpo_dt_fast.py --num-workers -1
probe python iql.py --batch-size 0
printf 'runs written: %s\n' "$(find "$tmp/runs" -type f 2>/dev/null | wc -l)"
