#!/usr/bin/env bash
# One call on the GPU machine. Parts run in the order given (default: tests bench); each
# writes its full log under $OUT and a summary to $OUT/log.txt. On a machine of two GPUs,
# `split` runs `ep` first, then the GPU suite on GPU 0 while `bench bench_fp8` run on GPU 1.
#   tests      the whole GPU suite (4 processes) bench      zeromoe bench --graph --peers torch
#   sweep      benchmarks/expert_sweep.py (every part)   prefill  benchmarks/fp8_prefill.py
#   bench_fp8  zeromoe bench --quantization fp8 --graph   load  from_pretrained of a 39 GB layer
#   ep         2 ranks: equality check (zeromoe launch, torchrun) and bench --ep 2
#   memcheck   compute-sanitizer over tests/test_gpu.py (small shapes)
#   replay     graph tests, then benchmarks/graph_replay.py (bf16, fp8), then profile
#   profile    benchmarks/graph_profile.py (bf16, fp8): the kernel timeline of graph replays
#   router     benchmarks/router_variants.py: router_gemv's split and unroll at 1-32 tokens
#   fp8_small  bench fp8 at 4-32 tokens, the pair kernels against the grouped ones
#   depth      benchmarks/stream_depth.py (bf16, fp8): the stream kernels' steps in flight
#   tiles      benchmarks/stream_tiles.py: capacity against the stream kernel's tiles per pass
export PYTHONUNBUFFERED=1
parts=${*:-tests bench}
# $OUT: the device tool's output folder (its files come back); refuse to write elsewhere
[ -n "${OUT:-}" ] && [ -d "$OUT" ] || { echo "gpu_session.sh: set OUT to an existing folder" >&2; exit 2; }
known=" tests replay profile router prefill sweep bench bench_fp8 fp8_small depth tiles load ep memcheck split "
for p in $parts; do
  [[ $known == *" $p "* ]] || { echo "gpu_session.sh: unknown part '$p' (parts:$known)" >&2; exit 2; }
done
log="$OUT/log.txt"
# the card's identity and limits: kernels that issue many instructions per byte ran 10-17%
# apart on two H200s whose copy rates were equal (benchmarks/NOTES.md)
nvidia-smi --query-gpu=name,driver_version,uuid,clocks.max.sm,clocks.max.mem,power.limit \
  --format=csv,noheader | tee -a "$log"

part() {
  echo "== $1 $(date +%T) (GPU ${CUDA_VISIBLE_DEVICES:-all})" | tee -a "$log"
  case $1 in
    tests)
      # seven pytest processes on the GPU at once (the suite alone takes over 600 s); test_gpu.py
      # alone ran past 290 s on an H200 beside the others, hence in two
      # OpenBLAS spins a thread per core in each process: seven processes of 16 threads on 16
      # cores left four of them unfinished at 330 s (H200 host); two threads each, four for e.
      # SIGINT at the limit: pytest then still prints its failures
      export ZEROMOE_TEST_SEED=${ZEROMOE_TEST_SEED:-$(date +%s)}  # the tests' inputs (conftest.py)
      echo "ZEROMOE_TEST_SEED=$ZEROMOE_TEST_SEED" | tee -a "$log"
      run_tests() {
        OPENBLAS_NUM_THREADS=${THREADS:-2} OMP_NUM_THREADS=${THREADS:-2} \
        timeout -s INT -k 30 330 python3 -m pytest -m gpu -p no:cacheprovider -q --durations=5 "${@:2}" \
          > "$OUT/$1.txt" 2>&1
        echo "$1 rc=$?" >> "$OUT/$1.txt"
      }
      run_tests gpu_tests_a tests/test_gpu.py -k "route_kernel or zero_expert" &
      THREADS=4 run_tests gpu_tests_e tests/test_gpu.py -k "not (route_kernel or zero_expert)" &
      # (test_fp8_gpu.py ran past 330 s alone, 235 of its 241 tests done: in two)
      run_tests gpu_tests_b tests/test_fp8_gpu.py -k "wgmma or forward_matches" &
      run_tests gpu_tests_g tests/test_fp8_gpu.py -k "not (wgmma or forward_matches)" &
      run_tests gpu_tests_f tests/test_interop_gpu.py tests/test_bench_gpu.py \
        tests/test_checkpoint.py tests/test_parallel_gpu.py &
      # (c took 60-77 s and d 216-278 s on an H200 with test_moepp.py in d: it moved to c)
      run_tests gpu_tests_c tests/test_graphs_gpu.py tests/test_moepp.py &
      run_tests gpu_tests_d tests/test_reliability_gpu.py &
      wait
      # one file back (the device tool returns at most eight)
      cat "$OUT"/gpu_tests_?.txt > "$OUT/gpu_tests.txt" && rm "$OUT"/gpu_tests_?.txt
      grep -hE "^(FAILED|ERROR)|passed|failed| rc=|seed" "$OUT/gpu_tests.txt" | tail -40 | tee -a "$log"
      grep -hE "^[0-9.]+s (call|setup)" "$OUT/gpu_tests.txt" | sort -rn | head -12 | tee -a "$log" ;;
    replay)
      timeout 60 python3 benchmarks/pdl_chain.py 2>&1 | tail -6 | tee -a "$log"
      timeout ${GRAPH_TESTS_S:-280} python3 -m pytest -m gpu -p no:cacheprovider -q tests/test_graphs_gpu.py \
        tests/test_fp8_gpu.py -k "graph or programmatic or replay or padded" > "$OUT/graph_tests.txt" 2>&1
      echo "graph tests rc=$?" | tee -a "$log"
      grep -hE "^(FAILED|ERROR)|passed|failed" "$OUT/graph_tests.txt" | tail -12 | tee -a "$log"
      for q in bf16 fp8; do
        timeout 150 python3 benchmarks/graph_replay.py --tokens ${REPLAY_TOKENS:-1,2,4,8,16,32,64,128,256,1024} \
          $([ $q = fp8 ] && echo --quantization fp8) --json "$OUT/replay_$q.json" \
          > "$OUT/replay_$q.txt" 2>&1
        tail -14 "$OUT/replay_$q.txt" | tee -a "$log"
      done
      part profile ;;
    profile)
      # plain launches (PROFILE_PLAIN=0: programmatic ones, whose kernel durations overlap)
      for q in bf16 fp8; do
        timeout 120 python3 benchmarks/graph_profile.py --tokens ${PROFILE_TOKENS:-1,4,16,64} \
          $([ $q = fp8 ] && echo --quantization fp8) $([ "${PROFILE_PLAIN:-1}" = 1 ] && echo --plain) \
          --json "$OUT/profile_$q.json" > "$OUT/profile_$q.txt" 2>&1
        tail -60 "$OUT/profile_$q.txt" | tee -a "$log"
      done ;;
    router)
      timeout 120 python3 benchmarks/router_variants.py --json "$OUT/router.json" > "$OUT/router.txt" 2>&1
      tail -50 "$OUT/router.txt" | tee -a "$log" ;;
    prefill)
      timeout 300 python3 benchmarks/fp8_prefill.py ${PREFILL_TOKENS:-} > "$OUT/prefill.txt" 2>&1
      tail -12 "$OUT/prefill.txt" | tee -a "$log" ;;
    sweep)
      timeout 200 python3 benchmarks/expert_sweep.py "$OUT/sweep.json" syncfree,pairs,capacity,dummy,fp8 \
        > "$OUT/sweep.txt" 2>&1
      tail -40 "$OUT/sweep.txt" | tee -a "$log" ;;
    bench)
      timeout 260 python3 -m zeromoe_cupy bench --graph --peers torch --json "$OUT/bench.json" \
        --plot "$OUT/bench.png" > "$OUT/bench.txt" 2>&1
      tail -16 "$OUT/bench.txt" | tee -a "$log" ;;
    bench_fp8)
      timeout 240 python3 -m zeromoe_cupy bench --quantization fp8 --graph \
        --tokens 1,4,16,32,64,128,256,1024,4096,16384 --json "$OUT/bench_fp8.json" \
        > "$OUT/bench_fp8.txt" 2>&1
      tail -16 "$OUT/bench_fp8.txt" | tee -a "$log" ;;
    fp8_small)
      # the fp8 layer at few tokens through the grouped kernels ("syncfree": one weight read per
      # pass over an expert's rows) against the default pair kernels (one read per pair)
      for st in auto syncfree; do
        timeout 150 python3 -m zeromoe_cupy bench --quantization fp8 --graph --strategy $st \
          --tokens 4,8,16,24,32 --json "$OUT/fp8_small_$st.json" > "$OUT/fp8_small_$st.txt" 2>&1
        tail -8 "$OUT/fp8_small_$st.txt" | tee -a "$log"
      done ;;
    depth)
      timeout 170 python3 benchmarks/stream_depth.py --depths 1,2,4,6 --tokens 16,32,64,128 \
        --json "$OUT/depth_bf16.json" > "$OUT/depth_bf16.txt" 2>&1
      tail -8 "$OUT/depth_bf16.txt" | tee -a "$log"
      timeout 200 python3 benchmarks/stream_depth.py --quantization fp8 --depths 2,4,6 \
        --tokens 1,4,8,16,32,64,128,256 --json "$OUT/depth_fp8.json" > "$OUT/depth_fp8.txt" 2>&1
      tail -12 "$OUT/depth_fp8.txt" | tee -a "$log" ;;
    tiles)
      timeout 300 python3 benchmarks/stream_tiles.py --json "$OUT/stream_tiles.json" \
        > "$OUT/stream_tiles.txt" 2>&1
      tail -10 "$OUT/stream_tiles.txt" | tee -a "$log" ;;
    load)
      timeout 200 python3 benchmarks/load_bench.py /tmp/zeromoe_load --json "$OUT/load.json" \
        > "$OUT/load.txt" 2>&1
      tail -8 "$OUT/load.txt" | tee -a "$log" ;;
    ep)
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      timeout 100 python3 -m zeromoe_cupy launch -n 2 tests/ep_gpu_check.py > "$OUT/ep_check.txt" 2>&1
      echo "launch rc=$?" | tee -a "$log"
      timeout 100 python3 -m torch.distributed.run --nproc-per-node 2 tests/ep_gpu_check.py \
        > "$OUT/ep_torchrun.txt" 2>&1
      echo "torchrun rc=$?" | tee -a "$log"
      grep -h "EP CHECK" "$OUT/ep_check.txt" "$OUT/ep_torchrun.txt" | tee -a "$log"
      timeout 150 python3 -m zeromoe_cupy bench --ep 2 --quick --tokens 1,128,1024,4096,16384 \
        --json "$OUT/ep2.json" > "$OUT/ep_bench.txt" 2>&1
      grep -v "^\[rank 1\]" "$OUT/ep_bench.txt" | tail -12 | tee -a "$log" ;;
    memcheck)
      timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 \
        python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "not longcat" \
        > "$OUT/memcheck.txt" 2>&1
      echo "memcheck rc=$?" | tee -a "$log"
      grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.txt" | tail -3 | tee -a "$log" ;;
  esac
}

if [ "$parts" = split ]; then
  part ep
  (export CUDA_VISIBLE_DEVICES=0; part tests) &
  (export CUDA_VISIBLE_DEVICES=1; part bench; part bench_fp8) &
  wait
else
  for p in $parts; do part "$p"; done
fi
