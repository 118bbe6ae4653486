#!/usr/bin/env bash
# Runs on a machine with an NVIDIA GPU, from the repository root, with the release binaries
# built elsewhere in .devbin/ (gyre and the cuda_parity test binary):
#   cargo build --release -p gyre-cli
#   cargo test --release -p gyre --test cuda_parity --no-run   # copy the printed binary
# It finds CUDA's libraries, runs the CUDA parity tests (required to open the device), then
#   $BENCH   "shape:batch:prompt:gen ...": gyre bench --json, one line each;
#   $PROFILE "shape:batch:prompt:gen ...": the same with GYRE_CUDA_PROFILE=1 (device time per
#            kernel, launches timed one by one: not for the speed figures);
#   $CURVE   "shape:batch:prompt:gen:points ..." (batch may be `max`): the Figure 1a curve,
#            its table in $OUT/figure1a-SHAPE.txt.
# Set GYRE_CUDA_PDL=1 in the environment to bench the programmatic-dependent-launch GEMVs.
# Output goes to $OUT if set.
set -u
OUT=${OUT:-/tmp/gyre-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# CUDA 13 libraries: the toolkit's, else the pip wheels' (nvidia-* packages).
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, q, "lib") for p in nvidia.__path__ for q in os.listdir(p)))' 2>/dev/null); do
  [ -d "$d" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$d"
done
export LD_LIBRARY_PATH
echo "libraries: $(ls $(echo $LD_LIBRARY_PATH | tr ':' ' ') 2>/dev/null | grep -E '^lib(nvrtc|cublas)\.so' | sort -u | tr '\n' ' ')"
if [ "${TESTS:-1}" = 1 ]; then
  GYRE_REQUIRE_CUDA=1 .devbin/cuda_parity --test-threads 1 --nocapture 2>&1 | tee "$OUT/tests.log" | grep -E "test |Δ|panicked|result" | tail -80
  # The same with the GEMVs as programmatic dependents (experimental, GYRE_CUDA_PDL=1).
  echo "== parity with GYRE_CUDA_PDL=1"
  GYRE_CUDA_PDL=1 GYRE_REQUIRE_CUDA=1 .devbin/cuda_parity --test-threads 1 2>&1 | tee "$OUT/tests-pdl.log" | grep -E "panicked|result"
fi
if [ "${E2E:-1}" = 1 ]; then
  # The binary end to end: greedy text on the GPU equals the CPU's (tiny chat Llama).
  args=(generate --model crates/gyre-cli/tests/fixtures/tiny_chat --temperature 0 --max-tokens 32 --prompt "Hello there")
  cpu=$(.devbin/gyre "${args[@]}" --device cpu 2>&1)
  gpu=$(.devbin/gyre "${args[@]}" --device cuda 2>&1)
  if [ "$cpu" = "$gpu" ]; then echo "e2e generate: cpu and cuda agree"; else printf 'e2e generate: DIFFER\ncpu: %s\ncuda: %s\n' "$cpu" "$gpu"; fi | tee "$OUT/e2e.log"
fi
for b in ${BENCH:-}; do
  IFS=: read -r shape batch prompt gen <<<"$b"
  echo "== bench $shape batch $batch prompt $prompt gen $gen"
  .devbin/gyre bench --device cuda --synthetic "$shape" --batch "$batch" --prompt "$prompt" --gen "$gen" --json \
    2>>"$OUT/bench.err" | tee -a "$OUT/bench.log" | grep -E "prefill:|decode:|bandwidth ratio|machine read"
done
for b in ${PROFILE:-}; do
  IFS=: read -r shape batch prompt gen <<<"$b"
  echo "== profile $shape batch $batch prompt $prompt gen $gen"
  GYRE_CUDA_PROFILE=1 .devbin/gyre bench --device cuda --synthetic "$shape" --batch "$batch" --prompt "$prompt" \
    --gen "$gen" 2>&1 | tee "$OUT/profile-$shape-b$batch.log" | grep -E "decode:|µs each" | head -40
done
for b in ${CURVE:-}; do
  IFS=: read -r shape batch prompt gen points <<<"$b"
  echo "== curve $shape batch $batch prompt $prompt gen $gen points $points"
  .devbin/gyre bench --device cuda --synthetic "$shape" --batch "$batch" --prompt "$prompt" --gen "$gen" \
    --curve "$points" 2>>"$OUT/bench.err" | tee "$OUT/figure1a-$shape.txt"
done
