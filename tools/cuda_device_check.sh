#!/usr/bin/env bash
# Runs on a machine with an NVIDIA GPU, from the repository root, with the release binaries
# built elsewhere in .devbin/ (gyre and the cuda_parity test binary):
#   cargo build --release -p gyre-cli
#   cargo test --release -p gyre --test cuda_parity --no-run   # copy the printed binary
# It finds CUDA's libraries, runs the CUDA parity tests (required to open the device), then
# the benchmarks named in $BENCH ("shape:batch:prompt:gen ..."). Output goes to $OUT if set.
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
fi
for b in ${BENCH:-}; do
  IFS=: read -r shape batch prompt gen <<<"$b"
  echo "== bench $shape batch $batch prompt $prompt gen $gen"
  .devbin/gyre bench --device cuda --synthetic "$shape" --batch "$batch" --prompt "$prompt" --gen "$gen" --json \
    2>>"$OUT/bench.err" | tee -a "$OUT/bench.log" | grep -E "prefill:|decode:|bandwidth ratio|machine read"
done
