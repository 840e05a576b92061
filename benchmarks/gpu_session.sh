#!/usr/bin/env bash
# One call on the GPU machine. Parts (default: tests sweep ops bench chunk memcheck); also
# bench_fp32 (router_gemm='fp32'), bench_det (deterministic=True), router and ncu.
# Summaries go to $OUT/log.txt; full logs and JSON beside it.
export PYTHONUNBUFFERED=1
parts=${*:-tests sweep ops bench chunk memcheck}
log="$OUT/log.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
for part in $parts; do
  echo "== $part $(date +%T)" | tee -a "$log"
  case $part in
    tests)
      timeout 420 python3 -m pytest -m gpu -p no:cacheprovider -q tests > "$OUT/gpu_tests.txt" 2>&1
      grep -E "passed|failed|Error" "$OUT/gpu_tests.txt" | tail -25 | tee -a "$log" ;;
    sweep)
      timeout 200 python3 benchmarks/strategy_sweep.py "$OUT/sweep.json" 2>&1 | tail -20 | tee -a "$log" ;;
    ops)
      nvidia-smi -q -d CLOCK | grep -A3 -E "^    (Clocks|Applications Clocks|Max Clocks)$" >> "$log"
      nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_event_reasons.active --format=csv \
        -lms 250 > "$OUT/clocks.txt" 2>&1 & smi=$!
      timeout 90 python3 benchmarks/ops_bench.py "$OUT/ops_bench.json" 2>&1 | tail -16 | tee -a "$log"
      kill $smi; sort "$OUT/clocks.txt" | uniq -c | sort -rn | head -5 | tee -a "$log" ;;
    bench)
      timeout 240 python3 -m zeromoe_cupy bench --peers torch --json "$OUT/bench.json" \
        --plot "$OUT/bench.png" 2>&1 | tail -14 | tee -a "$log" ;;
    bench_fp32)
      timeout 150 python3 -m zeromoe_cupy bench --router-gemm fp32 --tokens 4096,16384 \
        --json "$OUT/bench_fp32.json" 2>&1 | tail -8 | tee -a "$log" ;;
    bench_det)
      timeout 200 python3 -m zeromoe_cupy bench --deterministic --tokens 1,128,4096,16384 \
        --json "$OUT/bench_det.json" 2>&1 | tail -8 | tee -a "$log" ;;
    router)
      timeout 120 python3 benchmarks/router_precision.py "$OUT/router.json" 2>&1 | tail -8 | tee -a "$log" ;;
    chunk)
      timeout 150 python3 benchmarks/chunk_bitwise.py 2>&1 | tee -a "$log" ;;
    memcheck)
      timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 \
        python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "not longcat" \
        > "$OUT/memcheck.txt" 2>&1
      echo "memcheck rc=$?" | tee -a "$log"
      grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.txt" | tail -3 | tee -a "$log" ;;
    ncu)
      timeout 120 ncu --clock-control none -k regex:route_kernel -c 2 \
        --section SpeedOfLight --section WarpStateStats --section InstructionStats \
        python3 benchmarks/kernels_ncu.py > "$OUT/ncu.txt" 2>&1
      grep -E "Duration|Executed Instructions|Registers|Warp Cycles Per Issued" "$OUT/ncu.txt" \
        | head -12 | tee -a "$log" ;;
  esac
done
