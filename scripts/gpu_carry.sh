#!/usr/bin/env bash
# Fill a folder with what scripts/gpu_check.sh needs on a GPU machine that has no network.
#
#   scripts/gpu_carry.sh [DIR] [ME_WHEEL_DIR]
#
# DIR (default: <repo>/.gpu_carry, git-ignored) gets:
#   wheels/      the Python packages sparkme needs beyond a torch image: hydra-core, omegaconf,
#                antlr4-python3-runtime (built here: PyPI has no wheel), timm, safetensors, and
#                setuptools + wheel for the offline editable install (for GPU_PYTHON_VERSION, default 3.12)
#   debs/        Debian's OpenBLAS (headers, libopenblas, libgfortran5, libquadmath0): MinkowskiEngine
#                links OpenBLAS; they are unpacked under /tmp there, never into /
#   minkowski/   a MinkowskiEngine cache: sdist/ (sha256-checked) and, with ME_WHEEL_DIR, a prebuilt
#                CUDA wheel under wheels/<key>/ (what an earlier gpu_check.sh run left in $OUT/me_wheel;
#                used when its key matches that machine's torch, Python and GPU, else built from the sdist)
# Runs here with network (pip, apt-get download); about 20 MB, inside the device tool's 64 MiB.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/.gpu_carry}"
ME_WHEEL_DIR="${2:-}"
PYV="${GPU_PYTHON_VERSION:-3.12}"
PY="${SPARKME_VENV:-$REPO/.venv}/bin/python"
say() { printf '[gpu_carry] %s\n' "$*"; }
die() { printf '[gpu_carry] error: %s\n' "$*" >&2; exit 1; }

[[ -x "$PY" ]] || die "no $PY: run scripts/install.sh first (or set SPARKME_VENV)"
command -v apt-get >/dev/null || die "apt-get is needed to download the OpenBLAS .deb files"
mkdir -p "$DIR/wheels" "$DIR/debs" "$DIR/minkowski/sdist"

# --- Python wheels: the versions this environment runs, pure Python except safetensors (abi3) --------
# the installed version, else $2 (the venv may lack setuptools' wheel package)
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
PIP=("$PY" -m pip --disable-pip-version-check -q)
specs=()
for pkg in hydra-core:1.3.2 omegaconf:2.3.0 timm:1.0.31 safetensors:0.6.2 setuptools:80.9.0 wheel:0.45.1; do
    specs+=("${pkg%%:*}==$(version "${pkg%%:*}" "${pkg#*:}")")
done
say "pip download ${specs[*]} (Python $PYV)"
"${PIP[@]}" download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$DIR/wheels" "${specs[@]}"
antlr="antlr4-python3-runtime==$(version antlr4-python3-runtime 4.9.3)"
if ! ls "$DIR"/wheels/antlr4_python3_runtime-*.whl >/dev/null 2>&1; then
    say "building a wheel of $antlr (PyPI has its sdist only)"
    "${PIP[@]}" wheel --no-deps -w "$DIR/wheels" "$antlr"
fi

# --- OpenBLAS .deb files (Debian bookworm's build runs on the Ubuntu 24.04 image) ------------------
say "apt-get download OpenBLAS and its Fortran runtime"
(cd "$DIR/debs" && apt-get download libopenblas0-pthread libopenblas-pthread-dev libgfortran5 libquadmath0 >/dev/null) \
    || die "apt-get download failed (run apt-get update first?)"

# --- MinkowskiEngine source, and a prebuilt CUDA wheel if one was handed back -----------------------
sdist="$("$PY" -c "import sys; sys.path.insert(0, '$REPO/scripts/minkowski'); import build; print(build.fetch_sdist(build.DEFAULT_CACHE))")"
cp "$sdist" "$DIR/minkowski/sdist/"
if [[ -n "$ME_WHEEL_DIR" ]]; then
    found=0
    for keydir in "$ME_WHEEL_DIR"/*/; do
        ls "$keydir"*.whl >/dev/null 2>&1 || continue
        mkdir -p "$DIR/minkowski/wheels/$(basename "$keydir")"
        cp "$keydir"*.whl "$DIR/minkowski/wheels/$(basename "$keydir")/"
        found=1
        say "prebuilt MinkowskiEngine wheel $(basename "$keydir")"
    done
    ((found)) || die "no <key>/*.whl under $ME_WHEEL_DIR (expected the me_wheel folder a gpu_check.sh run returned)"
fi

size_mib=$(( $(du -sb "$DIR" | cut -f1) / 1048576 ))
((size_mib < 60)) || die "$DIR holds ${size_mib} MiB; the device tool carries 64 MiB with the working tree"
say "ready: $DIR (${size_mib} MiB). On the GPU machine: scripts/gpu_check.sh $(basename "$DIR")"
