#!/usr/bin/env bash
# The fuzz campaign of RELIABILITY.md: every target (or those named) for 10^6 executions with the
# issue's limits, then the working corpus minimized into corpus/<target>/. Run from anywhere:
#   bash fuzz/campaign.sh [TARGET...]        RUNS=N to change the executions per target
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and, on stable Rust, RUSTC_BOOTSTRAP=1 (set here).
# The fuzz build needs no CUDA: the crate builds CPU-only (PREFIX_TUNE_CACHE points nowhere), but
# bindgen needs libclang (LIBCLANG_PATH, as scripts/setup finds it).
set -euo pipefail
cd "$(dirname "$0")"
# One rayon thread: the loaders' parallel loops on tiny inputs only add thread hand-offs.
export RUSTC_BOOTSTRAP=1 PREFIX_TUNE_CACHE=/nonexistent RAYON_NUM_THREADS=1
: "${LIBCLANG_PATH:=/usr/lib/llvm-14/lib}"
export LIBCLANG_PATH
RUNS="${RUNS:-1000000}"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    mapfile -t TARGETS < <(cargo fuzz list)
fi
# -s none: no sanitizer (the crate is safe Rust; a sanitizer's 2-3x slowdown buys little), so
# huge allocations are caught by the targets' own allocator (fuzz_targets/_common.rs) instead of
# -malloc_limit_mb; -a: debug assertions and overflow checks on.
FLAGS=(-s none -a)
cargo fuzz build "${FLAGS[@]}"
mkdir -p logs
for t in "${TARGETS[@]}"; do
    mkdir -p "work/$t" "corpus/$t" "regressions/$t"
    echo "== $t: $RUNS runs"
    cargo fuzz run "${FLAGS[@]}" "$t" "work/$t" "corpus/$t" "seeds/$t" -- \
        -runs="$RUNS" -max_len=65536 -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=1 \
        -print_final_stats=1 2>&1 | tee "logs/$t.log" | grep -E "^(#[0-9]+ +DONE|stat::|==|SUMMARY)" || true
    # Minimize: the inputs of work/ and corpus/ that add coverage, into a fresh corpus/.
    rm -rf "corpus/$t.new" && mkdir -p "corpus/$t.new"
    cargo fuzz run "${FLAGS[@]}" "$t" "corpus/$t.new" "corpus/$t" "work/$t" -- \
        -merge=1 -max_len=65536 -rss_limit_mb=2048 -timeout=1 >"logs/$t.merge.log" 2>&1
    rm -rf "corpus/$t" && mv "corpus/$t.new" "corpus/$t"
    echo "   corpus/$t: $(ls "corpus/$t" | wc -l) files, $(du -sk "corpus/$t" | cut -f1) KB"
    { echo "== $t $(date -u +%FT%TZ)"; grep -E "^(stat::|SUMMARY|==[0-9]+== ERROR)" "logs/$t.log" || true
      echo "corpus: $(ls "corpus/$t" | wc -l) files, $(du -sk "corpus/$t" | cut -f1) KB"; } >>logs/summary.txt
done
