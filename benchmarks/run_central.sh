#!/usr/bin/env bash
# The CPU-budget rows of BENCHMARKS.md's centralised table, most important first.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() { echo "== $*"; $PY -m benchmarks.bench_central "$@" || echo "FAILED: $*"; }
if [ "${1:-}" != "--skip-first" ]; then
  run --method dm --ipc 10 --iterations 2000 --batch-real 64 --num-nets 2 --id central-fmnist-dm-ipc10-acc
fi
run --method dsa --ipc 10 --iterations 5 --batch-real 64 --num-nets 2 --id central-fmnist-dsa-ipc10-acc
run --method dm --ipc 50 --iterations 300 --batch-real 64 --num-nets 1 --id central-fmnist-dm-ipc50-acc
for m in random herding kcenter; do run --method $m --ipc 10 --num-nets 2; done
for m in random herding kcenter; do run --method $m --ipc 1 --num-nets 3; done
run --method dm --ipc 1 --iterations 500 --batch-real 64 --num-nets 3
run --method dc --ipc 1 --iterations 50 --batch-real 64 --num-nets 3
run --method dsa --ipc 1 --iterations 50 --batch-real 64 --num-nets 3
run --method dc --ipc 10 --iterations 3 --batch-real 64 --num-nets 2
for m in random herding kcenter; do run --method $m --ipc 50 --num-nets 1; done
# Decoupled and factorised rows (2026-12-06): RDED's teacher is cached in runs/bench/.cache by the first row.
run --method rded --ipc 10 --num-nets 3 --teacher-epochs 5
run --method rded --ipc 10 --factor 2 --num-nets 3 --teacher-epochs 5
run --method rded --ipc 10 --factor 2 --labels teacher --protocol soft-label-kd --num-nets 3 --teacher-epochs 5
run --method rded --ipc 10 --labels teacher --protocol soft-label-kd --num-nets 3 --teacher-epochs 5
$PY -m benchmarks.bench_accuracy_per_hour --methods rded rded:f2 dm dm:f2 --minutes 8 --checkpoints 2 8 --num-nets 1
