#!/usr/bin/env bash
# Take a fresh machine to a working sparkme environment; fast when re-run.
#
#   scripts/install.sh            # system packages, .venv, torch, MinkowskiEngine, sparkme
#
# Environment knobs:
#   SPARKME_VENV=DIR          virtual environment (default: <repo>/.venv)
#   SPARKME_ME_MODE=cpu|cuda  force the MinkowskiEngine build kind (default: auto)
#   SPARKME_CACHE=DIR         wheel cache (default: ~/.cache/sparkme)
#   SPARKME_TORCH="torch==X torchvision==Y"   the torch to install when none is there
#   SPARKME_PYTHON=python3.11 interpreter for the venv
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPARKME_VENV:-$REPO/.venv}"
PY="${SPARKME_PYTHON:-python3}"
say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

# --- system packages -------------------------------------------------------------
APT_PACKAGES=(build-essential ninja-build libopenblas-dev python3-venv)
# the extension build needs the interpreter's C headers (pyenv/conda pythons ship them)
"$PY" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
    || APT_PACKAGES+=(python3-dev)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    # python3-venv only matters when the interpreter cannot make a venv by itself.
    if [[ " ${missing[*]} " == *" python3-venv "* ]] && "$PY" -c "import venv, ensurepip" 2>/dev/null; then
        missing=("${missing[@]/python3-venv}")
        read -r -a missing <<<"${missing[*]}"
    fi
fi
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null; then
        die "missing system packages (${missing[*]}) and no apt-get: install their equivalents and re-run"
    fi
    if [[ $(id -u) -ne 0 ]]; then
        die "missing system packages; run as root or ask an admin for:  apt-get install -y ${missing[*]}"
    fi
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y --no-install-recommends "${missing[@]}"; }
fi

# --- virtual environment -----------------------------------------------------------
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "sparkme needs Python >= 3.11 (found $("$PY" --version)); set SPARKME_PYTHON"
if [[ ! -x "$VENV/bin/python" ]]; then
    venv_args=()
    if [[ -z "${SPARKME_TORCH:-}" ]] && "$PY" -c "import torch" 2>/dev/null; then
        # a machine that already has torch (a CUDA image, a GPU box): build against it
        venv_args=(--system-site-packages)
        say "reusing this interpreter's torch $("$PY" -c 'import torch; print(torch.__version__)')"
    fi
    say "creating $VENV"
    "$PY" -m venv "${venv_args[@]}" "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# --- torch -------------------------------------------------------------------------
if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
    read -r -a torch_spec <<<"${SPARKME_TORCH:-torch==2.14.1 torchvision==0.29.1}"
    say "installing ${torch_spec[*]} (large; once)"
    "${PIP[@]}" install "${torch_spec[@]}"
fi

# --- MinkowskiEngine (patched, cached wheel) ---------------------------------------
"$VPY" -c "import numpy, setuptools, wheel" 2>/dev/null || "${PIP[@]}" install numpy setuptools wheel
"$VPY" "$REPO/scripts/minkowski/build.py" ${SPARKME_ME_MODE:+--mode "$SPARKME_ME_MODE"}

# --- sparkme itself (skipped when pyproject.toml is unchanged) ------------------------
stamp="$VENV/.sparkme-install-stamp"
want="$(sha256sum "$REPO/pyproject.toml" | cut -c1-16) $REPO"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]] || ! "$VPY" -c "import sparkme.conf" 2>/dev/null; then
    say "installing sparkme (editable) with its dependencies"
    "${PIP[@]}" install -e "$REPO[dev]"
    echo "$want" >"$stamp"
fi
say "ready: $VENV"
