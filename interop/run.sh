#!/usr/bin/env sh
# `make interop`: write imageqc's IPRs with the project's venv, then read and check them with
# cellbin2 1.2.1 in a Python 3.8 venv (see docs/INTEROP.md). Not part of `make test`.
#
# Environment (all optional):
#   CELLBIN2_PYTHON  a Python that already has cellbin2 1.2.1 (e.g. /work/peer-cellbin2-venv/bin/python);
#                    used read-only (no .pyc written), and no venv is built
#   INTEROP_PYTHON   the Python 3.8 to build .interop-venv/ with (default: pyenv's 3.8.18, else python3.8)
#   INTEROP_VENV     where to build it (default .interop-venv; pip installs about 1.4 GB)
#   INTEROP_OUT      where the IPRs and inputs go (default build/interop)
#   INTEROP_ARGS     passed to check_cellbin2.py (e.g. --quiet)
#   PROJECT_PYTHON   the project's Python (default .venv/bin/python)
set -eu
cd "$(dirname "$0")/.."
PROJECT_PYTHON=${PROJECT_PYTHON:-.venv/bin/python}
OUT=${INTEROP_OUT:-build/interop}

if [ -n "${CELLBIN2_PYTHON:-}" ]; then
    CB_PY=$CELLBIN2_PYTHON
    export PYTHONDONTWRITEBYTECODE=1
else
    VENV=${INTEROP_VENV:-.interop-venv}
    if ! "$VENV/bin/python" -c "import cellbin2" >/dev/null 2>&1; then
        PY38=${INTEROP_PYTHON:-}
        if [ -z "$PY38" ]; then
            for candidate in /root/.pyenv/versions/3.8.18/bin/python python3.8; do
                if command -v "$candidate" >/dev/null 2>&1; then PY38=$candidate; break; fi
            done
        fi
        if [ -z "$PY38" ] || ! "$PY38" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))' >/dev/null 2>&1; then
            echo "interop: cellbin2 1.2.1 needs Python 3.8; found none (tried: ${PY38:-pyenv 3.8.18, python3.8})." >&2
            echo "  Set INTEROP_PYTHON=/path/to/python3.8, or CELLBIN2_PYTHON to a Python with cellbin2 installed." >&2
            exit 2
        fi
        echo "interop: building $VENV with $PY38 (pip install cellbin2==1.2.1, about 1.4 GB)"
        "$PY38" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install "cellbin2==1.2.1"
    fi
    CB_PY=$VENV/bin/python
fi

"$PROJECT_PYTHON" interop/make_iprs.py "$OUT"
# shellcheck disable=SC2086
"$CB_PY" interop/check_cellbin2.py "$OUT" ${INTEROP_ARGS:-}
