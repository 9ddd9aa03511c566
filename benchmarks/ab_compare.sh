#!/usr/bin/env bash
# Before/after in one run: step time (and the first step, which carries dpclip's verification) of two git
# revisions, interleaved: for each repetition, each revision, each model, non-private and dpclip, one fresh process
# each (benchmarks/compare_opacus.py --worker), one thread. Prints one JSON line per run: "<rep> <rev> {...}".
#   bash benchmarks/ab_compare.sh OLD_REV NEW_REV [REPS] > benchmarks/results/ab.jsonl
#   AB_MODELS="cnn resnet" bash benchmarks/ab_compare.sh ...   # other models of compare_opacus.py (default: mlp cnn transformer)
set -euo pipefail
old=${1:?old revision}; new=${2:?new revision}; reps=${3:-3}
root=$(git rev-parse --show-toplevel); work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/old" >/dev/null 2>&1 || true; git -C "$root" worktree remove --force "$work/new" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$root" worktree add -f "$work/old" "$old" >/dev/null 2>&1
git -C "$root" worktree add -f "$work/new" "$new" >/dev/null 2>&1
export BENCH_THREADS=1 OMP_NUM_THREADS=1
py="$root/.venv/bin/python"
for rep in $(seq "$reps"); do for tree in old new; do for model in ${AB_MODELS:-mlp cnn transformer}; do for lib in nonprivate dpclip; do
  echo "$rep $tree $(PYTHONPATH="$work/$tree" "$py" "$work/$tree/benchmarks/compare_opacus.py" --worker "$model" "$lib" --steps 15 --warmup 3 2>/dev/null | tail -1)"
done; done; done; done
