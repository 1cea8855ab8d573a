"""The installed environment and the installer's MinkowskiEngine steps."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "minkowski" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


patches = _load("patches")
build = _load("build")


def test_sparkme_and_minkowski_import_in_the_installed_environment():
    import MinkowskiEngine as ME

    import sparkme

    assert ME.__version__ == "0.5.4"
    assert sparkme.__version__
    # the project is installed with its mapped packages, as from a wheel
    import sparkme.benchmarks
    import sparkme.conf
    import sparkme.converters

    assert sparkme.converters.__name__ == "sparkme.converters"
    # the configs ship with the package: the CLI's primary config composes from the installed module
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="sparkme.conf", version_base=None):
        cfg = compose(config_name="pretrain", overrides=["experiment=spark_resnet50"])
    assert cfg.model.model_name == "resnet50"


def test_installed_build_is_stamped_with_the_current_key():
    key, _ = build.build_key("cpu" if not torch.cuda.is_available() else "cuda")
    assert build.installed_key() == key


def test_minkowski_convolution_forward_and_backward_on_cpu():
    import MinkowskiEngine as ME

    torch.manual_seed(0)
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 2, 2], [1, 2, 3]], dtype=torch.int32)
    feats = torch.randn(5, 3, requires_grad=True)
    x = ME.SparseTensor(feats, coordinates=coords)
    conv = ME.MinkowskiConvolution(3, 4, kernel_size=3, stride=1, dimension=2)
    y = conv(x)
    assert y.F.shape == (5, 4)
    # the output at site (0,0,0) only sees its active neighbours (0,0,1) and (0,1,1)
    kernel = conv.kernel.detach()  # [9, in, out]
    expected = feats[0] @ kernel[4]
    assert not torch.allclose(y.F[0], expected)  # neighbours contribute
    y.F.square().sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    assert conv.kernel.grad is not None and conv.kernel.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def sdist() -> Path:
    return build.fetch_sdist(build.DEFAULT_CACHE)


@pytest.fixture()
def source(tmp_path: Path, sdist: Path) -> Path:
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path / "MinkowskiEngine-0.5.4"


@pytest.mark.parametrize("cuda", [False, True])
def test_patch_step_is_idempotent(source: Path, cuda: bool):
    first = patches.apply_patches(source, cuda=cuda)
    assert first, "a pristine source must need edits"
    assert "from collections.abc import Sequence" in (source / "MinkowskiEngine/MinkowskiCommon.py").read_text()
    snapshot = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    assert patches.apply_patches(source, cuda=cuda) == []
    assert snapshot == {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}


def test_cuda_patches_are_left_out_of_cpu_builds(source: Path):
    patches.apply_patches(source, cuda=False)
    assert "thrust::unary_function" in (source / "src/coordinate_map_functors.cuh").read_text()
    assert patches.patch_set_hash(cuda=False) != patches.patch_set_hash(cuda=True)


def test_patch_that_no_longer_applies_names_the_file_and_writes_nothing(source: Path):
    common = source / "MinkowskiEngine/MinkowskiCommon.py"
    common.write_text(common.read_text().replace("from collections import Sequence", "import collections"))
    setup_before = (source / "setup.py").read_text()
    with pytest.raises(patches.PatchError, match="MinkowskiEngine/MinkowskiCommon.py"):
        patches.apply_patches(source, cuda=False)
    assert (source / "setup.py").read_text() == setup_before


def test_tampered_archive_is_refused(tmp_path: Path, sdist: Path):
    tampered = tmp_path / sdist.name
    shutil.copy(sdist, tampered)
    with open(tampered, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(build.BuildError, match="sha256 mismatch"):
        build.verify_sdist(tampered)
    cache = tmp_path / "cache"
    (cache / "sdist").mkdir(parents=True)
    shutil.copy(tampered, cache / "sdist" / sdist.name)
    with pytest.raises(build.BuildError, match="sha256 mismatch"):
        build.fetch_sdist(cache)


def test_cache_key_tracks_torch_abi_and_patches(monkeypatch):
    key, _ = build.build_key("cpu")
    facts = build.torch_facts()
    monkeypatch.setattr(build, "torch_facts", lambda: {**facts, "torch": "9.9.9"})
    assert build.build_key("cpu")[0] != key
    monkeypatch.setattr(build, "torch_facts", lambda: {**facts, "cxx11_abi": "0" if facts["cxx11_abi"] == "1" else "1"})
    assert build.build_key("cpu")[0] != key


def test_a_wheel_that_does_not_import_is_rebuilt_never_kept(monkeypatch, tmp_path: Path):
    key, _ = build.build_key("cpu")
    stale = tmp_path / "wheels" / key
    stale.mkdir(parents=True)
    (stale / "MinkowskiEngine-0.5.4-stale.whl").write_bytes(b"stale")
    calls: list[str] = []
    monkeypatch.setattr(build, "installed_key", lambda: None)
    monkeypatch.setattr(build, "install_wheel", lambda wheel, key, facts: calls.append(Path(wheel).name))
    results = iter([(False, "ImportError: undefined symbol: _ZN3c10"), (True, "0.5.4")])
    monkeypatch.setattr(build, "import_ok", lambda: next(results))
    monkeypatch.setattr(build, "site_stamp", lambda: tmp_path / "stamp.json")

    def fake_build(sdist, mode, out_dir):
        out_dir.mkdir(parents=True)
        wheel = out_dir / "MinkowskiEngine-0.5.4-fresh.whl"
        wheel.write_bytes(b"fresh")
        return wheel

    monkeypatch.setattr(build, "fetch_sdist", lambda cache: tmp_path / "sdist.tar.gz")
    monkeypatch.setattr(build, "build_wheel", fake_build)
    assert build.ensure("cpu", tmp_path) == key
    assert calls == ["MinkowskiEngine-0.5.4-stale.whl", "MinkowskiEngine-0.5.4-fresh.whl"]


def test_every_package_directory_is_installed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    declared = set(config["packages"])
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            name = ".".join([package, *relative.parts]) if relative.parts else package
            if any(part.startswith((".", "__")) for part in relative.parts):
                continue
            if name.split(".")[0:2] != ["sparkme", "conf"] or name == "sparkme.conf":
                assert name in declared, f"{init.parent} is a package but pyproject does not install {name}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = "scripts/install.sh && .venv/bin/python -m pytest"
    assert command in readme
    assert ci.strip().splitlines()[-1] == command
