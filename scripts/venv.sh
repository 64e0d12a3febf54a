#!/usr/bin/env bash
# Ensure the project's virtual environment exists and print its path. The venv is cached outside the
# checkout, keyed on requirements.txt, so CI on the same machine reuses it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
key=$(sha256sum < "$here/requirements.txt" | cut -c1-12)
cache=${NNUNETCAM_CACHE:-$HOME/.cache/nnunetcam}
venv="$cache/venv-$key"
py=${PYTHON:-python3}
if [ ! -f "$venv/.complete" ]; then
  echo "creating $venv (torch is large: a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$here/requirements.txt" >&2
  touch "$venv/.complete"
fi
# the checkout may move (CI clones elsewhere): (re)point the editable install at this one. Checked from / so
# that the checkout itself (the current directory) does not satisfy the import.
if ! (cd / && "$venv/bin/python" -c "import nnunetv2_cam_core, sys; sys.exit(0 if nnunetv2_cam_core.__file__.startswith('$here/') else 1)" 2>/dev/null); then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$here" >&2
fi
echo "$venv"
