"""The CUDA build of MinkowskiEngine compiles on a machine with nvcc and no GPU, and imports with CUDA.

The compile (``cuda_build``) takes ~16 minutes on 2 cores the first time; the wheel is cached under
the same key as the installer's builds (ME version, patch-set hash, torch, ABI, CUDA, architectures,
Python), so only a changed patch set, another torch or a fresh machine pays it again. Nothing is
installed: the wheel is imported from a temporary folder beside this torch.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "minkowski" / "build.py"


def _load(name: str):
    if name in sys.modules and getattr(sys.modules[name], "__file__", "").startswith(str(SCRIPT.parent)):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load("patches")
build = _load("build")


@pytest.mark.cuda_build
def test_cuda_wheel_compiles_without_a_gpu_and_imports_with_cuda(tmp_path: Path, monkeypatch):
    if build.find_nvcc() is None:
        pytest.skip(build.NO_NVCC)
    if not torch.version.cuda:
        pytest.skip("this torch is a CPU-only build: a CUDA MinkowskiEngine needs a CUDA torch to compile against")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", build.DEFAULT_ARCH_WITHOUT_GPU))
    installed_before = build.installed_key()

    wheel, facts = build.wheel_only("cuda", build.DEFAULT_CACHE, tmp_path)

    assert facts["mode"] == "cuda" and facts["patches"] == build.patch_set_hash(cuda=True)
    assert wheel.parent == tmp_path and wheel.stat().st_size > 1_000_000
    assert build.check_wheel_imports(wheel, cuda=True) == "0.5.4 cuda"
    # the installed (CPU or GPU) MinkowskiEngine is untouched
    assert build.installed_key() == installed_before
    assert build.import_ok()[0]


def test_wheel_only_builds_into_the_cache_and_installs_nothing(tmp_path: Path, monkeypatch):
    built: list[Path] = []

    def fake_build(sdist, mode, out_dir):
        out_dir.mkdir(parents=True)
        wheel = out_dir / "MinkowskiEngine-0.5.4-cp311-cp311-linux_x86_64.whl"
        wheel.write_bytes(b"wheel")
        built.append(out_dir)
        return wheel

    def refuse(*args, **kwargs):
        raise AssertionError("--wheel-only must not install")

    monkeypatch.setattr(build, "fetch_sdist", lambda cache: tmp_path / "sdist.tar.gz")
    monkeypatch.setattr(build, "build_wheel", fake_build)
    monkeypatch.setattr(build, "install_wheel", refuse)
    monkeypatch.setattr(build.subprocess, "run", refuse)
    cache, out = tmp_path / "cache", tmp_path / "out"
    first, facts = build.wheel_only("cpu", cache, out)
    second, _ = build.wheel_only("cpu", cache, tmp_path / "again")
    key, _ = build.build_key("cpu")
    assert built == [cache / "wheels" / key]  # the second call came from the cache
    assert first.read_bytes() == second.read_bytes() == b"wheel"
    assert facts["mode"] == "cpu" and f'"key": "{key}"' in (out / f"{first.name}.json").read_text()


def test_without_nvcc_the_cuda_build_says_so_in_one_line(tmp_path: Path):
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "no-cuda"), PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin")
    if any(Path(d, "nvcc").exists() for d in env["PATH"].split(":")):
        pytest.skip("nvcc is in /usr/bin here")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--mode", "cuda", "--wheel-only", "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[minkowski] error: nvcc not found"), done.stderr
    assert "cuda-toolkit[nvcc,cccl]" in lines[0]
    assert not (tmp_path / "out").exists()


def test_import_check_reports_the_build_kind_of_the_installed_cpu_wheel(tmp_path: Path):
    key, _ = build.build_key("cpu")
    wheels = sorted((build.DEFAULT_CACHE / "wheels" / key).glob("*.whl"))
    if not wheels:
        pytest.skip(f"no cached CPU wheel under {build.DEFAULT_CACHE / 'wheels' / key}")
    assert build.check_wheel_imports(wheels[0], cuda=False) == "0.5.4 cpu-only"
    with pytest.raises(build.BuildError, match="expected CUDA support"):
        build.check_wheel_imports(wheels[0], cuda=True)
