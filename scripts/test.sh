#!/usr/bin/env bash
# Postern's whole test suite, as CI runs it (.ci/run):
#
#   1. scripts/setup.sh      installs what is missing (PostgreSQL, iproute2, ...)
#   2. cargo fmt --check     formatting
#   3. cargo clippy          every crate and target, warnings are errors
#   4. cargo test            unit, integration and example/bench targets of every crate
#   5. cargo test --doc      the examples in the API documentation compile
#   6. scripts/demo.sh       the README demo, end to end, non-interactively
#
# Run from anywhere; honours a pre-set CARGO_TARGET_DIR. Stops at the first
# failing stage. The last line printed sums up the test results.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# A one-off build does not profit from incremental compilation's caches, and
# writing them slows the ~45 test binaries of a cold run. Set
# CARGO_INCREMENTAL=1 to keep them for repeated local runs.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

started=$SECONDS
stage_started=$SECONDS
stage() {
    printf '\n==== test.sh: %s\n' "$*"
    stage_started=$SECONDS
}
took() { printf '==== done in %ss\n' "$((SECONDS - stage_started))"; }

results=$(mktemp /tmp/postern-test-results.XXXXXX)
trap 'rm -f "$results"' EXIT

stage "setup (scripts/setup.sh)"
bash scripts/setup.sh
for tool in fmt clippy; do
    component=$([ "$tool" = fmt ] && echo rustfmt || echo clippy)
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            echo "test.sh: installing $component (rustup component add $component)"
            rustup component add "$component"
        else
            echo "test.sh: error: cargo $tool is not installed and rustup is not available; install the $component component" >&2
            exit 1
        fi
    fi
done
took

stage "format (cargo fmt --all -- --check)"
cargo fmt --all -- --check
took

stage "lint (cargo clippy --workspace --all-targets --locked -- -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings
took

stage "tests (cargo test --workspace --all-targets --locked)"
cargo test --workspace --all-targets --locked --no-fail-fast 2>&1 | tee -a "$results"
took

stage "doc tests (cargo test --workspace --doc --locked)"
cargo test --workspace --doc --locked 2>&1 | tee -a "$results"
took

stage "end to end (DEMO_NONINTERACTIVE=1 scripts/demo.sh, with the binary the tests built)"
# The demo would build a release binary: minutes of CI for the same code the
# tests just built. It runs the test build's binary instead.
target_dir=$(cargo metadata --format-version 1 --no-deps --locked 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
DEMO_NONINTERACTIVE=1 POSTERN_BIN="${target_dir:-${CARGO_TARGET_DIR:-$ROOT/target}}/debug/postern" \
    bash scripts/demo.sh
took

# Sum up cargo's "test result:" lines.
summary=$(awk '
    /^test result:/ {
        suites++
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/)   passed  += $(i - 1)
            if ($(i) ~ /^failed;?$/)   failed  += $(i - 1)
            if ($(i) ~ /^ignored;?$/)  ignored += $(i - 1)
        }
    }
    END { printf "%d passed, %d failed, %d ignored in %d test suites", passed, failed, ignored, suites }
' "$results")
printf '\ntest.sh: all stages passed in %ss (fmt, clippy, demo ok); cargo test: %s\n' \
    "$((SECONDS - started))" "$summary"
