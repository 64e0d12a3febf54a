#!/usr/bin/env bash
# The panel's tests run on real Qt (PyQt5, offscreen). Its wheels bring Qt, not the system libraries Qt links to:
# where they are missing, install them from Debian (root), once.
set -euo pipefail
py="$1/bin/python"
if ! QT_QPA_PLATFORM=offscreen "$py" -c "from PyQt5 import QtWidgets; QtWidgets.QApplication([])" >/dev/null 2>&1; then
  echo "installing the system libraries Qt needs (libgl1, libglib2.0-0, libfontconfig1, libdbus-1-3, libx11-6 ...)" >&2
  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    libgl1 libglib2.0-0 libfontconfig1 libfreetype6 libdbus-1-3 libx11-6 libx11-xcb1 libxext6 libxkbcommon0 >&2
fi
