#!/usr/bin/env bash
# Creates (once) the Python environment the serve tests drive the server with: the official
# `openai` client at the versions pinned in tools/serve/requirements.txt, in
# $PREFIX_TUNE_CACHE/serve-venv (default cache: ${XDG_CACHE_HOME:-~/.cache}/prefix-tune).
# Only the package registry (PyPI) is used. Prints the venv's python on the last line of
# stdout; exits non-zero (with the reason on stderr) when the venv cannot be made.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
cache="${PREFIX_TUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefix-tune}"
venv="$cache/serve-venv"
py="$venv/bin/python"
stamp="$venv/.requirements"
if [ -x "$py" ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
    echo "$py"
    exit 0
fi
command -v python3 >/dev/null || { echo "setup_client: python3 not found" >&2; exit 1; }
mkdir -p "$cache"
rm -rf "$venv"
python3 -m venv "$venv" >&2 || { echo "setup_client: python3 -m venv failed (install python3-venv)" >&2; exit 1; }
"$py" -m pip install --quiet --disable-pip-version-check --no-input -r "$req" >&2 \
    || { echo "setup_client: pip install -r $req failed" >&2; rm -rf "$venv"; exit 1; }
"$py" -c "import openai; print('openai', openai.__version__)" >&2
cp "$req" "$stamp"
echo "$py"
