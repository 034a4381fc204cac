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
  echo "bootstrap: installing pf_metered, its extras and dev tools into .venv (about 100" \
    "packages: 1-3 min the first time, pip's progress below; a copy goes to .venv/pip-install.log)" >&2
  log="$venv/pip-install.log"
  started=$SECONDS
  # pip's own lines (Collecting, Downloading, Installing) on stderr as they come, so a first
  # run shows it is moving (less a pip.conf's notes about absent local indexes); stdout stays
  # clean for whatever sourced this script
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check -e "$root[all,dev]" 2>&1 \
      | tee "$log" | sed -u -e "/^WARNING: Location '.*' is ignored: it is neither a file nor a/d" \
        -e 's/^/  pip: /' >&2; then
    echo "bootstrap: pip install failed; full log in $log" >&2
    exit 2
  fi
  echo "bootstrap: installed in $((SECONDS - started)) s" >&2
  echo "$want" > "$stamp"
fi
flock -u 9
exec 9>&-
export PATH="$venv/bin:$PATH"
