#!/usr/bin/env bash
# Paper-budget rows of the centralised table (REFERENCE.md §3/§4), for a machine with a GPU:
# DM 20,000 iterations with 256 real images per class, DSA 1000 iterations, evaluation with DSA
# augmentation for 1000 epochs over 5 nets. Rows go to benchmarks/results/central/*-paper.json.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() { echo "== $*"; $PY -m benchmarks.bench_central "$@" --eval-dsa --eval-epochs 1000 --num-nets 5 --tag=-paper || echo "FAILED: $*"; }
run --method dm --ipc 10 --iterations 20000 --batch-real 256
run --method dsa --ipc 10 --iterations 1000 --batch-real 256
run --method dm --ipc 50 --iterations 20000 --batch-real 256
run --method dm --ipc 1 --iterations 20000 --batch-real 256
