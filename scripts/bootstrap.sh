#!/usr/bin/env bash
# Make .venv hold this project and everything its tests, examples and benchmarks need.
# Sourced by scripts/demo and scripts/test; re-installs only when pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.12 python3.11 python3.10 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      py="$cand"; break
    fi
  done
fi
[ -n "$py" ] || { echo "bootstrap: need Python >= 3.10 on PATH" >&2; exit 2; }
if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv with $("$py" --version)" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.pf-metered-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
# One installer at a time: parallel test runs share this venv.
exec 9>"$venv/.install.lock"
flock 9
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "bootstrap: installing pf_metered and its dev tools into .venv (about 30 s)" >&2
  log="$venv/pip-install.log"
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check -e "$root[all,dev]" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "bootstrap: pip install failed; full log in $log" >&2
    exit 2
  fi
  echo "$want" > "$stamp"
fi
flock -u 9
exec 9>&-
export PATH="$venv/bin:$PATH"
