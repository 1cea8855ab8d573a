"""Build (or reuse) a MinkowskiEngine 0.5.4 wheel for the running torch and install it.

Run with the project's virtual environment's python:

    python scripts/minkowski/build.py [--mode auto|cpu|cuda] [--cache DIR]
    python scripts/minkowski/build.py --mode cuda --wheel-only --out DIR [--check-import]

``--wheel-only`` builds (or takes from the cache) the wheel and copies it to ``--out``
without installing anything: a CUDA wheel compiles on a machine with nvcc and no GPU
(``TORCH_CUDA_ARCH_LIST``, default 9.0 when no GPU is visible).

The wheel is cached under ``DIR/<key>/`` where the key names the ME version, the
patch-set hash, the torch version and C++ ABI, the CUDA version and the GPU
architectures, so a different torch or patch set never loads a stale binary. A
wheel that installs but fails to import is deleted and rebuilt once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patches import PatchError, apply_patches, patch_set_hash  # noqa: E402

ME_VERSION = "0.5.4"
SDIST_NAME = f"MinkowskiEngine-{ME_VERSION}.tar.gz"
SDIST_SHA256 = "b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94"
STAMP_NAME = "sparkme_minkowski_build.json"
DEFAULT_CACHE = Path(os.environ.get("SPARKME_CACHE", Path.home() / ".cache" / "sparkme")) / "minkowski"


class BuildError(RuntimeError):
    """Something the user must fix before MinkowskiEngine can be built."""


def log(msg: str) -> None:
    print(f"[minkowski] {msg}", flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sdist(path: Path) -> None:
    actual = sha256_of(path)
    if actual != SDIST_SHA256:
        raise BuildError(
            f"sha256 mismatch for {path}: expected {SDIST_SHA256}, got {actual}. "
            "The archive is not PyPI's MinkowskiEngine 0.5.4; delete it and run again."
        )


def fetch_sdist(cache: Path) -> Path:
    """Return the verified sdist, downloading it from PyPI into the cache if needed."""
    target = cache / "sdist" / SDIST_NAME
    if target.exists():
        verify_sdist(target)
        return target
    override = os.environ.get("SPARKME_ME_SDIST")
    if override:
        verify_sdist(Path(override))
        return Path(override)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log("downloading the MinkowskiEngine sdist from PyPI")
        env = dict(os.environ, SETUPTOOLS_USE_DISTUTILS="stdlib")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            f"minkowskiengine=={ME_VERSION}",
            "-d",
            tmp,
        ]
        subprocess.run(cmd, check=True, env=env)
        downloaded = Path(tmp) / SDIST_NAME
        verify_sdist(downloaded)
        os.replace(downloaded, target)
    return target


def torch_facts() -> dict[str, str]:
    import torch

    cuda = torch.version.cuda or "cpu"
    return {
        "torch": torch.__version__,
        "cxx11_abi": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "cuda": cuda,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def detect_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    if torch.version.cuda and torch.cuda.is_available() and find_nvcc():
        return "cuda"
    return "cpu"


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


NO_NVCC = (
    "nvcc not found (looked in $CUDA_HOME/bin, /usr/local/cuda/bin and PATH): install the CUDA toolkit "
    "matching torch's CUDA, or pip install 'cuda-toolkit[nvcc,cccl]==<torch CUDA>.*' and set CUDA_HOME "
    "(docs/gpu.md, 'nvcc from pip')"
)


def cuda_arch_list() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    import torch

    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch = ";".join(f"{major}.{minor}" for major, minor in caps)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        return arch
    raise BuildError("CUDA build without a visible GPU: set TORCH_CUDA_ARCH_LIST (e.g. '9.0').")


def build_key(mode: str) -> tuple[str, dict[str, str]]:
    facts = torch_facts()
    facts.update(me=ME_VERSION, mode=mode, patches=patch_set_hash(cuda=mode == "cuda"))
    facts["arch"] = cuda_arch_list() if mode == "cuda" else "none"
    if mode == "cuda" and facts["cuda"] == "cpu":
        raise BuildError("a CUDA build needs a CUDA build of torch; this torch is CPU-only")
    key = "me{me}-p{patches}-torch{torch}-abi{cxx11_abi}-cu{cuda}-arch{arch}-py{python}".format(**facts)
    return key.replace("+", "_").replace(";", "_").replace(" ", ""), facts


def check_toolchain(mode: str) -> None:
    missing = [tool for tool in ("gcc", "g++") if shutil.which(tool) is None]
    if missing:
        raise BuildError(
            f"missing compiler: {', '.join(missing)}. Install build-essential (apt-get install build-essential)."
        )
    if (
        not Path("/usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h").exists()
        and not list(Path("/usr/include").glob("**/cblas.h"))
        and not os.environ.get("CPATH")
    ):
        raise BuildError("OpenBLAS headers not found: apt-get install libopenblas-dev")
    if mode == "cuda" and find_nvcc() is None:
        raise BuildError(NO_NVCC)


CUDA_LINK_LIBRARIES = ("cublas", "cublasLt", "cusparse", "cudart")


def add_pip_cuda_libraries(env: dict[str, str], cuda_home: Path, link_dir: Path) -> None:
    """Let a minimal CUDA toolkit (nvcc without cuBLAS/cuSPARSE) build against torch's NVIDIA wheels.

    torch's CUDA wheels bring ``nvidia/<cu>/include`` and versioned ``lib*.so.N`` files; the
    linker needs unversioned names, so they are symlinked into ``link_dir``.
    """
    if (cuda_home / "include" / "cublas_v2.h").exists():
        return
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    for include in sorted(site.glob("nvidia/*/include")):
        if not (include / "cublas_v2.h").exists():
            continue
        lib = include.parent / "lib"
        link_dir.mkdir(parents=True, exist_ok=True)
        for name in CUDA_LINK_LIBRARIES:
            found = sorted(lib.glob(f"lib{name}.so.*"))
            if found and not (link_dir / f"lib{name}.so").exists():
                (link_dir / f"lib{name}.so").symlink_to(found[0])
        for var, path in (("CPATH", include), ("LIBRARY_PATH", link_dir), ("LD_LIBRARY_PATH", lib)):
            env[var] = os.pathsep.join(filter(None, [str(path), env.get(var, "")]))
        log(f"using torch's NVIDIA libraries from {include.parent} (the toolkit at {cuda_home} has no cuBLAS)")
        return
    raise BuildError(f"the CUDA toolkit at {cuda_home} has no cublas_v2.h; install its cuda-libraries-dev part")


def build_wheel(sdist: Path, mode: str, out_dir: Path) -> Path:
    check_toolchain(mode)
    with tempfile.TemporaryDirectory(prefix="sparkme-me-build-") as tmp:
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = Path(tmp) / f"MinkowskiEngine-{ME_VERSION}"
        changed = apply_patches(source, cuda=mode == "cuda")
        log(f"applied {len(changed)} edits from the sparkme patch set")
        cmd = [sys.executable, "setup.py", "bdist_wheel", "--blas=openblas"]
        cmd.append("--force_cuda" if mode == "cuda" else "--cpu_only")
        env = dict(os.environ)
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        if mode == "cuda":
            env["CUDA_HOME"] = str(Path(find_nvcc()).parent.parent)
            add_pip_cuda_libraries(env, Path(env["CUDA_HOME"]), Path(tmp) / "cuda-links")
        log(f"building ({mode}, MAX_JOBS={env['MAX_JOBS']}); this takes minutes: " + " ".join(cmd[1:]))
        log_path = out_dir.parent / f"build-{out_dir.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log_file:
            result = subprocess.run(cmd, cwd=source, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = log_path.read_text().splitlines()[-40:]
            raise BuildError("MinkowskiEngine build failed; last lines of " + str(log_path) + ":\n" + "\n".join(tail))
        wheels = list((source / "dist").glob("*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"expected one wheel in {source / 'dist'}, found {wheels}")
        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy2(wheels[0], staging / wheels[0].name)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    return next(out_dir.glob("*.whl"))


DEFAULT_ARCH_WITHOUT_GPU = "9.0"


def wheel_only(mode: str, cache: Path, out: Path) -> tuple[Path, dict[str, str]]:
    """Build (or reuse from ``cache``) the wheel for ``mode`` and copy it into ``out``; install nothing."""
    mode = detect_mode(mode)
    if mode == "cuda":
        if find_nvcc() is None:
            raise BuildError(NO_NVCC)
        import torch

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_WITHOUT_GPU
            log(f"no GPU visible: TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_WITHOUT_GPU} (H100/H200)")
    key, facts = build_key(mode)
    wheel_dir = cache / "wheels" / key
    start = time.monotonic()
    wheels = sorted(wheel_dir.glob("*.whl"))
    if wheels:
        wheel, how = wheels[0], "from the cache"
    else:
        wheel = build_wheel(fetch_sdist(cache), mode, wheel_dir)
        how = f"built in {time.monotonic() - start:.0f} s"
    out.mkdir(parents=True, exist_ok=True)
    target = out / wheel.name
    if target.resolve() != wheel.resolve():
        shutil.copy2(wheel, target)
    (out / f"{wheel.name}.json").write_text(json.dumps({"key": key, **facts}, indent=1))
    log(f"{target} ({target.stat().st_size / 1e6:.1f} MB, {how}; key {key})")
    return target, facts


def check_wheel_imports(wheel: Path, cuda: bool) -> str:
    """Import the wheel, unpacked into a temporary folder, beside this torch; check its CUDA support.

    Nothing is installed: the unpacked folder goes first on ``PYTHONPATH`` of a child
    interpreter. Returns what the child printed; raises ``BuildError`` otherwise.
    """
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch, MinkowskiEngine as ME\n"
        "print(ME.__file__); print(ME.__version__, 'cuda' if ME.is_cuda_available() else 'cpu-only')\n"
    )
    with tempfile.TemporaryDirectory(prefix="sparkme-me-import-") as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tmp)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")])))
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True)
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            raise BuildError(f"{wheel.name} does not import beside torch:\n{output}")
        where, facts = result.stdout.strip().splitlines()[-2:]
        if not where.startswith(tmp):
            raise BuildError(f"imported MinkowskiEngine from {where}, not from {wheel.name}")
    if facts.endswith("cpu-only") == cuda:
        raise BuildError(f"{wheel.name}: expected {'CUDA' if cuda else 'CPU-only'} support, ME reports {facts}")
    return facts


def site_stamp() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"]) / STAMP_NAME


def installed_key() -> str | None:
    stamp = site_stamp()
    if not stamp.exists():
        return None
    return json.loads(stamp.read_text()).get("key")


def import_ok() -> tuple[bool, str]:
    code = "import warnings; warnings.simplefilter('ignore'); import MinkowskiEngine as ME; print(ME.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def install_wheel(wheel: Path, key: str, facts: dict[str, str]) -> None:
    stamp = site_stamp()
    stamp.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index", "-q", str(wheel)]
    subprocess.run(cmd, check=True)
    stamp.write_text(json.dumps({"key": key, "wheel": str(wheel), **facts}, indent=1))


def ensure(mode: str, cache: Path) -> str:
    """Make sure a MinkowskiEngine matching this torch and patch set is installed."""
    mode = detect_mode(mode)
    key, facts = build_key(mode)
    if installed_key() == key and import_ok()[0]:
        log(f"up to date ({key})")
        return key
    wheel_dir = cache / "wheels" / key
    for attempt in (1, 2):
        wheels = list(wheel_dir.glob("*.whl"))
        if wheels:
            log(f"installing cached wheel {wheels[0].name} ({key})")
        else:
            wheels = [build_wheel(fetch_sdist(cache), mode, wheel_dir)]
        install_wheel(wheels[0], key, facts)
        ok, output = import_ok()
        if ok:
            log(f"MinkowskiEngine {output} ready ({mode})")
            return key
        log(f"the wheel does not import with this torch, rebuilding: {output.splitlines()[-1:]}")
        site_stamp().unlink(missing_ok=True)
        shutil.rmtree(wheel_dir, ignore_errors=True)
        if attempt == 2:
            raise BuildError(f"MinkowskiEngine built but does not import:\n{output}")
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("auto", "cpu", "cuda"), default=os.environ.get("SPARKME_ME_MODE", "auto"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--wheel-only", action="store_true", help="build or reuse the wheel, install nothing")
    parser.add_argument("--out", type=Path, help="with --wheel-only: folder the wheel is copied to")
    parser.add_argument("--check-import", action="store_true", help="with --wheel-only: import it beside torch")
    args = parser.parse_args(argv)
    if (args.out is not None or args.check_import) and not args.wheel_only:
        parser.error("--out and --check-import go with --wheel-only")
    try:
        if args.wheel_only:
            wheel, facts = wheel_only(args.mode, args.cache, args.out or Path("dist"))
            if args.check_import:
                log(f"import check: {check_wheel_imports(wheel, cuda=facts['mode'] == 'cuda')}")
            return 0
        ensure(args.mode, args.cache)
    except (BuildError, PatchError) as err:
        print(f"[minkowski] error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
