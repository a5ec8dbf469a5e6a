#!/usr/bin/env bash
# The federated rows of BENCHMARKS.md (Fashion-MNIST, 10 clients, ConvNet-3 width 64), headline ids first,
# then the client-count scaling rows. Each row takes the shared benchmark lock when one is given.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOCK=${BENCH_LOCK:-}
run() {
  echo "== $*"
  if [ -n "$LOCK" ]; then flock "$LOCK" nice -n 5 $PY -m benchmarks.bench_fed "$@"; else $PY -m benchmarks.bench_fed "$@"; fi \
    || echo "FAILED: $*"
}
DISTILL=(--iterations 300 --eval-epochs 300 --eval-dsa)
MULTI=(--rounds 5 --iterations 60 --eval-epochs 60 --eval-dsa)
run --protocol one-shot --alpha 0.5 "${DISTILL[@]}" \
    --record fed-fmnist-dir0.5-oneshot-dm-ipc10-acc=accuracy --record fed-fmnist-dir0.5-oneshot-upload-bytes=upload_bytes
run --protocol fedavg --alpha 0.5 --rounds 10 \
    --record fed-fmnist-dir0.5-fedavg-acc=accuracy --record fed-fmnist-fedavg-round-upload-bytes=round_upload_bytes
run --protocol multi-round --alpha 0.5 "${MULTI[@]}"
run --protocol multi-round --alpha 0.5 "${MULTI[@]}" --aggregate-window 5
run --protocol multi-round --alpha 0.5 --rounds 5 --iterations 300 --eval-epochs 60 --eval-dsa --aggregate-window 5 \
    --tag it300
run --protocol multi-round --alpha 0.5 "${MULTI[@]}" --aggregate-window 5 --client-start fresh \
    --record fed-fmnist-dir0.5-multiround-dm-ipc10-acc=accuracy
run --protocol multi-round --alpha 0.5 "${MULTI[@]}" --aggregate-window 5 --client-start fresh --seed 1 --tag seed1 \
    --output runs/bench-seed1
run --protocol fedprox --alpha 0.5 --rounds 10
for clients in 10 50 100; do
  record=()
  [ "$clients" = 100 ] && record=(--record fed-round-100-clients-seconds=round_seconds)
  run --protocol one-shot --clients "$clients" --iterations 20 --eval-epochs 30 --min-partition-size 20 --tag scaling "${record[@]}"
done
run --protocol one-shot --alpha 0.1 "${DISTILL[@]}"
run --protocol fedavg --alpha 0.1 --rounds 10
run --protocol multi-round --alpha 0.1 "${MULTI[@]}"
run --protocol multi-round --alpha 0.1 "${MULTI[@]}" --aggregate-window 5 --client-start fresh
run --protocol fedprox --alpha 0.1 --rounds 10
