#!/usr/bin/env bash
# Expert-parallel scaling run on one host with 2, 4 or 8 GPUs, as one command:
#   benchmarks/ep_scaling.sh [OUT_DIR] [TOKENS]
# For each rank count R in 2 4 8 that the machine has GPUs for: the equality check at
# LongCat-Flash shapes (tests/ep_gpu_check.py, every rank against the one-GPU layer and the
# float64 reference) and `zeromoe bench --ep R` at TOKENS per rank (default 128,1024,4096,16384),
# which also times the one-GPU layer at the same tokens per GPU. Then a weak-scaling table:
# efficiency = one-GPU time / EP per-rank time (max over ranks), per R and tokens per rank.
# Logs and JSON go to OUT_DIR (default $OUT, else benchmarks/results/ep).
set -uo pipefail
# NVLink multicast must stay off on the multi-GPU machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT_DIR=${1:-${OUT:-benchmarks/results/ep}}
TOKENS=${2:-128,1024,4096,16384}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
GPUS=$($PY -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())")
echo "GPUs: $GPUS" | tee "$OUT_DIR/ep_scaling.log"
status=0
for R in 2 4 8; do
  [ "$R" -le "$GPUS" ] || continue
  echo "== $R ranks: equality check ==" | tee -a "$OUT_DIR/ep_scaling.log"
  $PY -m zeromoe_cupy launch -n "$R" tests/ep_gpu_check.py > "$OUT_DIR/ep_check_$R.log" 2>&1 \
    || status=1
  grep "EP CHECK" "$OUT_DIR/ep_check_$R.log" | tee -a "$OUT_DIR/ep_scaling.log"
  echo "== $R ranks: bench ==" | tee -a "$OUT_DIR/ep_scaling.log"
  $PY -m zeromoe_cupy bench --ep "$R" --tokens "$TOKENS" --json "$OUT_DIR/ep$R.json" \
    2>&1 | tee "$OUT_DIR/bench_ep$R.log" | grep -v "^\[rank [1-9]" || status=1
done
$PY - "$OUT_DIR" <<'PY' | tee -a "$OUT_DIR/ep_scaling.log"
import glob, json, sys
print("weak scaling (one-GPU ms / EP per-rank ms, max over ranks)")
print(f"{'ranks':>5} {'T/rank':>6} {'1-GPU ms':>9} {'EP ms':>9} {'eff':>6} {'EP/floor':>8}")
for path in sorted(glob.glob(f"{sys.argv[1]}/ep[0-9]*.json")):
    res = json.load(open(path))
    for per_rank in res["rows"]:
        ep = max(r["ep_ns"] for r in per_rank) / 1e6
        one = max(r["one_gpu_ns"] for r in per_rank) / 1e6
        floor = max(r["floor_ns"] for r in per_rank) / 1e6
        print(f"{res['ranks']:>5} {per_rank[0]['tokens']:>6} {one:>9.3f} {ep:>9.3f} "
              f"{one / ep:>6.2f} {ep / floor:>8.2f}")
PY
exit $status
