#!/usr/bin/env bash
# The newcomer's path, checked: clone the repository (committed files only) into a temporary folder, make a new
# virtual environment, and run the README's two commands exactly as written there (read from README.md, not
# copied here, so the check cannot drift from the docs). Usage: bench/fresh_clone.sh [--tests-only]
# Needs python3 with venv and the package index (or a local wheel mirror that pip is configured for).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone --quiet "$repo" "$work/mmr5"
cd "$work/mmr5"
python3 -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
# The two commands are the two lines of the README's first ```bash block that start with "pip install".
mapfile -t commands < <(grep -m2 '^pip install torch' README.md)
[ "${#commands[@]}" -eq 2 ] || { echo "error: README.md does not hold the two 'pip install ...' commands" >&2; exit 1; }
main="${commands[0]}"; tests="${commands[1]}"
if [ "${1:-}" != "--tests-only" ]; then
  echo "== $main"; start=$(date +%s)
  bash -c "$main"
  echo "== main job: $(( $(date +%s) - start )) s"
fi
echo "== $tests"; start=$(date +%s)
bash -c "$tests"
echo "== tests: $(( $(date +%s) - start )) s"
