#!/usr/bin/env bash
# The GPU check, prepared for a machine with torch + CUDA and no network (one short run):
# install MinkowskiEngine (CUDA) and sparkme from carried files, run the GPU tests, run the GPU benchmark.
#
#   scripts/gpu_check.sh [CARRY_DIR]        # CARRY_DIR: made by scripts/gpu_carry.sh (default .gpu_carry)
#
# Steps (each timed in the log): OpenBLAS from the carried .deb files (unpacked under /tmp, only if
# the machine lacks it) -> sparkme and its missing dependencies from the carried wheels (pip, offline,
# editable) -> MinkowskiEngine for this GPU: the carried prebuilt wheel when its key (torch, Python,
# GPU architecture, patch set) matches, else built from the carried sdist (~140 s on 16 cores) ->
# `pytest -m gpu` -> `sparkme-bench bench=gpu rounds=2 isolate=false` into docs/bench/gpu_<date>/ ->
# the Triton backend timed against the gather backend (ResNet-50 encoder fwd+bwd, fp32 and bf16, 3
# interleaved rounds) into docs/bench/gpu_<date>/triton/.
# Budget: about 8 minutes on one H100/H200 with a build, 6 with a prebuilt wheel, plus about one for the
# Triton timing (an estimate: 12 cases and the kernels' first compile).
#
# With $OUT set (the device tool), the log, the benchmark results and the MinkowskiEngine wheel built
# there are copied under $OUT (9 files at most): gpu_check.log, bench/results.{md,json,csv,png},
# triton/results.md, me_wheel/<key>/<wheel> (carry that folder next time: scripts/gpu_carry.sh DIR $OUT/me_wheel).
#
# Knobs: GPU_CHECK_PYTHON (python3), GPU_CHECK_BENCH_ARGS ("bench=gpu rounds=2 isolate=false"),
# GPU_CHECK_BENCH_DIR (docs/bench/gpu_<UTC date>), GPU_CHECK_SKIP_BENCH=1, GPU_CHECK_SKIP_TRITON=1,
# GPU_CHECK_TRITON_ARGS ("bench=gpu models=[resnet50] measures=[encoder] rounds=3 isolate=false"), TORCH_CUDA_ARCH_LIST,
# GPU_CHECK_DRY_RUN=1 (no GPU needed: the carried OpenBLAS is unpacked and linked, sparkme is
# installed offline, the sdist is checked; then it stops before MinkowskiEngine and the GPU steps).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${GPU_CHECK_PYTHON:-python3}"
CARRY_ARG="${1:-.gpu_carry}"
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:-bench=gpu rounds=2 isolate=false}"
BENCH_DIR="${GPU_CHECK_BENCH_DIR:-docs/bench/gpu_$(date -u +%Y-%m-%d)}"
RESULTS="${OUT:-}"
LOG="${RESULTS:-/tmp}/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
START=$SECONDS
say() { printf '[gpu_check %4ds] %s\n' $((SECONDS - START)) "$*"; }
die() { printf '[gpu_check %4ds] error: %s\n' $((SECONDS - START)) "$*"; exit 1; }
trap 'rc=$?; ((rc == 0)) || say "stopped with exit status $rc (log: $LOG)"' EXIT

# --- preflight ------------------------------------------------------------------------------------
[[ -d "$CARRY_ARG" ]] || die "no carried folder '$CARRY_ARG': prepare it with scripts/gpu_carry.sh and carry it"
CARRY="$(cd "$CARRY_ARG" && pwd)"
for need in wheels debs minkowski/sdist; do
    [[ -d "$CARRY/$need" ]] || die "$CARRY/$need is missing: re-run scripts/gpu_carry.sh"
done
command -v "$PY" >/dev/null || die "no '$PY' on PATH (set GPU_CHECK_PYTHON)"
for tool in cc g++ dpkg ldconfig; do
    command -v "$tool" >/dev/null || die "'$tool' is missing on this machine (needed to unpack OpenBLAS and build MinkowskiEngine)"
done
export PYTHONUNBUFFERED=1
DRY="${GPU_CHECK_DRY_RUN:-0}"
"$PY" - "$DRY" <<'PY' || die "this python's torch sees no CUDA GPU (the check needs one; CPU tests run in CI)"
import sys, torch
gpu = torch.cuda.is_available()
print(f"torch {torch.__version__} CUDA {torch.version.cuda}; " + (
    f"{torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})" if gpu else "no GPU"))
sys.exit(not (gpu or sys.argv[1] == "1"))
PY
say "python $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)'), $(nproc) CPU cores"

# --- OpenBLAS -------------------------------------------------------------------------------------
if [[ "$DRY" != 1 && -f /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ]] && ldconfig -p | grep -q 'libopenblas.so.0 '; then
    say "OpenBLAS: the system's"
else
    blas=/tmp/sparkme-openblas
    rm -rf "$blas" && mkdir -p "$blas"
    for deb in "$CARRY"/debs/*.deb; do dpkg -x "$deb" "$blas"; done
    inc="$blas/usr/include/x86_64-linux-gnu/openblas-pthread"
    lib="$blas/usr/lib/x86_64-linux-gnu/openblas-pthread"
    [[ -f "$inc/cblas.h" && -e "$lib/libopenblas.so.0" ]] || die "the carried .deb files hold no OpenBLAS ($CARRY/debs)"
    ln -sf libopenblas.so.0 "$lib/libopenblas.so"
    export CPATH="$inc${CPATH:+:$CPATH}" LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if ! ldconfig -p | grep -q 'libgfortran.so.5 '; then  # the system's own Fortran runtime wins when there is one
        export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$blas/usr/lib/x86_64-linux-gnu"
    fi
    printf '#include <cblas.h>\nint main(void){double x[2]={1,2};return cblas_ddot(2,x,1,x,1)!=5.0;}\n' >"$blas/t.c"
    cc "$blas/t.c" -o "$blas/t" -lopenblas && "$blas/t" || die "the carried OpenBLAS does not link or run here"
    say "OpenBLAS: carried, unpacked under $blas (cblas_ddot links and runs)"
fi

# --- sparkme and its missing dependencies (offline) --------------------------------------------------
say "pip install -e . from the carried wheels (offline; installed packages that fit are kept)"
"$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$CARRY/wheels" -e . \
    || die "offline install of sparkme failed: a dependency is neither on this machine nor in $CARRY/wheels"
"$PY" -c "import hydra, omegaconf, timm, safetensors, sparkme.conf" || die "sparkme does not import after install"

# --- MinkowskiEngine for this GPU ----------------------------------------------------------------------
cache=/tmp/sparkme-me-cache
rm -rf "$cache" && mkdir -p "$cache" && cp -r "$CARRY/minkowski/." "$cache/"
if [[ "$DRY" == 1 ]]; then
    "$PY" -c "import sys; sys.path.insert(0, 'scripts/minkowski'); import build, pathlib; build.fetch_sdist(pathlib.Path('$cache'))" \
        || die "the carried MinkowskiEngine sdist is missing or damaged"
    say "dry run: sdist checked, carried prebuilt wheel keys: $(ls "$cache"/wheels 2>/dev/null | tr '\n' ' ' || true)(matched on the GPU machine); stopping before the GPU steps"
    exit 0
fi
say "MinkowskiEngine (CUDA): a carried wheel if its key matches, else a build from the sdist"
"$PY" scripts/minkowski/build.py --mode cuda --cache "$cache" || die "MinkowskiEngine (CUDA) could not be installed"
"$PY" - <<'PY' || die "MinkowskiEngine imports but cannot convolve on the GPU"
import warnings; warnings.simplefilter("ignore")
import torch, MinkowskiEngine as ME
assert ME.is_cuda_available(), "MinkowskiEngine was built without CUDA"
coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1]], dtype=torch.int32)
x = ME.SparseTensor(torch.ones(3, 2, device="cuda"), coordinates=coords, device="cuda")
y = ME.MinkowskiConvolution(2, 3, kernel_size=3, dimension=2).cuda()(x)
print(f"MinkowskiEngine {ME.__version__} with CUDA: a convolution ran on {y.F.device}")
PY
if [[ -n "$RESULTS" ]]; then
    for keydir in "$cache"/wheels/*/; do
        [[ -n "$(ls "$keydir"*.whl 2>/dev/null)" ]] || continue
        mkdir -p "$RESULTS/me_wheel/$(basename "$keydir")" && cp "$keydir"*.whl "$RESULTS/me_wheel/$(basename "$keydir")/"
    done
fi

# --- GPU tests ----------------------------------------------------------------------------------------
say "pytest -m gpu"
set +e
"$PY" -m pytest -m gpu -q -p no:cacheprovider
tests_rc=$?
set -e
say "pytest -m gpu: exit status $tests_rc"

# --- GPU benchmark ------------------------------------------------------------------------------------
bench_rc=0
if [[ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]]; then
    read -r -a bench_args <<<"$BENCH_ARGS"
    say "sparkme-bench ${bench_args[*]} output_dir=$BENCH_DIR"
    set +e
    "$PY" -m sparkme.cli.bench "${bench_args[@]}" "output_dir=$BENCH_DIR"
    bench_rc=$?
    set -e
    say "sparkme-bench: exit status $bench_rc"
    if [[ -n "$RESULTS" && -d "$BENCH_DIR" ]]; then
        mkdir -p "$RESULTS/bench"
        cp "$BENCH_DIR"/results.* "$RESULTS/bench/" 2>/dev/null || true
    fi
fi

# --- Triton backend vs gather: ResNet-50 encoder fwd+bwd, fp32 and bf16, interleaved rounds ------------
triton_rc=0
if [[ "${GPU_CHECK_SKIP_TRITON:-0}" != 1 ]]; then
    read -r -a triton_args <<<"${GPU_CHECK_TRITON_ARGS:-bench=gpu models=[resnet50] measures=[encoder] rounds=3 isolate=false}"
    triton_paths="paths=[sparse-gather,sparse-triton,sparse-gather-bf16,sparse-triton-bf16]"
    say "sparkme-bench ${triton_args[*]} $triton_paths reference=sparse-gather output_dir=$BENCH_DIR/triton"
    set +e
    "$PY" -m sparkme.cli.bench "${triton_args[@]}" "$triton_paths" reference=sparse-gather plot=false \
        "output_dir=$BENCH_DIR/triton"
    triton_rc=$?
    set -e
    say "triton timing: exit status $triton_rc"
    if [[ -n "$RESULTS" && -d "$BENCH_DIR/triton" ]]; then
        mkdir -p "$RESULTS/triton"
        cp "$BENCH_DIR"/triton/results.md "$RESULTS/triton/" 2>/dev/null || true
    fi
fi

say "done: tests $tests_rc, bench $bench_rc, triton timing $triton_rc; results in $BENCH_DIR${RESULTS:+ and $RESULTS}"
((tests_rc == 0 && bench_rc == 0 && triton_rc == 0))
