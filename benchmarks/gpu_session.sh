#!/usr/bin/env bash
# One call on the GPU machine: the GPU suite, the benchmarks, a memcheck pass over the kernel
# tests, and the chunking check. Logs and JSON go to $OUT.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
timeout 300 python3 -m pytest -m gpu -p no:cacheprovider -q tests > "$OUT/gpu_tests.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests.txt" | tail -25
timeout 150 python3 -m zeromoe_cupy bench --peers torch --json "$OUT/bench.json" \
  --plot "$OUT/bench.png" > "$OUT/bench.txt" 2>&1; tail -8 "$OUT/bench.txt"
timeout 60 python3 benchmarks/ops_bench.py "$OUT/ops_bench.json" > "$OUT/ops_bench.txt" 2>&1
tail -16 "$OUT/ops_bench.txt"
timeout 40 python3 benchmarks/chunk_bitwise.py 2>&1 | tee "$OUT/chunk_bitwise.txt"
timeout 110 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -m gpu -q \
  -p no:cacheprovider tests/test_gpu.py -k "not longcat_layer" > "$OUT/memcheck.txt" 2>&1
echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.txt" | tail -3
