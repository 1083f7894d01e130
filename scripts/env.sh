# Source this file (bash/zsh) to point a shell at the toolchain scripts/setup installed:
#   source scripts/env.sh
# It sources <cache>/env.sh (NVCC, LIBCLANG_PATH), where the cache is $PREFIX_TUNE_CACHE or
# ${XDG_CACHE_HOME:-$HOME/.cache}/prefix-tune. Run scripts/setup first if it is missing.
_pt_cache="${PREFIX_TUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefix-tune}"
if [ -f "$_pt_cache/env.sh" ]; then
    . "$_pt_cache/env.sh"
else
    echo "scripts/env.sh: $_pt_cache/env.sh not found; run scripts/setup first" >&2
fi
unset _pt_cache
