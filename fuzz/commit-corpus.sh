#!/usr/bin/env bash
# After campaign.sh: reduce corpus/<target>/ to what is committed. The campaign's corpus (all
# features, hit counts included) moves to work/<target>/ (not committed; the next campaign starts
# from it too); corpus/<target>/ becomes a -merge=1 of it on edge coverage alone
# (-use_counters=0), its smallest files first, up to BUDGET_KB (default 48) per target.
#   bash fuzz/commit-corpus.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
export RAYON_NUM_THREADS=1
BUDGET=$(( ${BUDGET_KB:-48} * 1024 ))
BIN=target/x86_64-unknown-linux-gnu/release
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=($(ls corpus))
for t in "${TARGETS[@]}"; do
    mkdir -p "work/$t"
    find "corpus/$t" -maxdepth 1 -type f -exec mv -t "work/$t" {} +
    "$BIN/$t" -merge=1 -use_counters=0 -max_len=65536 -rss_limit_mb=2048 -timeout=5 \
        "corpus/$t" "work/$t" >"logs/$t.commit-merge.log" 2>&1
    total=0 kept=0 dropped=0
    while read -r size f; do
        if [ $((total + size)) -le "$BUDGET" ]; then
            total=$((total + size)); kept=$((kept + 1))
        else
            rm "corpus/$t/$f"; dropped=$((dropped + 1))   # still in work/
        fi
    done < <(cd "corpus/$t" && find . -maxdepth 1 -type f -printf '%s %f\n' | sort -n)
    echo "$t: $(grep -o '[0-9]* new coverage edges' "logs/$t.commit-merge.log" | tail -1);" \
        "committed $kept files ($((total / 1024)) KB), $dropped over the budget left in work/$t"
done
