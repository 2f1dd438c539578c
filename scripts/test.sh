#!/usr/bin/env bash
# Runs every check and every test, unit and integration: the one command CI runs.
# Needs root (integration tests start daemons, and later mount file systems).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

cleanup() {
  # Keep the tests' exit status: nothing below may turn a pass into a failure.
  local status=$?
  set +e +o pipefail
  # Daemons the integration harness started and did not stop (a crashed test).
  pkill -TERM -f '/tmp/berth-it' 2>/dev/null || true
  sleep 0.5
  pkill -KILL -f '/tmp/berth-it' 2>/dev/null || true
  # Mounts left below the harness's directories.
  grep -o ' /tmp/berth-it[^ ]*' /proc/self/mounts 2>/dev/null | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  exit "$status"
}
trap cleanup EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo deny (bans, licenses, sources)"
if ! command -v cargo-deny >/dev/null; then
  cargo install --locked cargo-deny
fi
# cargo-deny reads `cargo metadata` of every target's dependencies, windows-only crates
# included, which a build for this host never downloads: fetch them first (a no-op once
# cached), so the check itself runs offline on a fresh machine.
cargo fetch --locked
cargo deny --offline check bans licenses sources
echo "== build (the integration tests drive target/debug/berthd)"
cargo build --workspace --bins
echo "== tests"
# The suite takes about ten minutes; a hung test must fail the run, not outlast CI's limit.
# cargo test names it above ("has been running for over 60 seconds").
status=0
timeout --kill-after=30s 40m cargo test --workspace --no-fail-fast || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "== tests: stopped after 40 minutes; a test hangs (the one running for over 60 seconds above)" >&2
fi
exit "$status"
