"""sparkme's patch set for MinkowskiEngine 0.5.4 (PyPI sdist).

Each patch is a list of exact text edits. Applying is idempotent: an edit whose
result is already in the file is skipped; an edit whose source text is gone raises
``PatchError`` naming the patch and the file, so an upstream change never slips by.
Patches tagged ``cuda`` are applied to CUDA builds only; the cache key hashes exactly
the patches a build applies (see ``patch_set_hash``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Edit", "Patch", "PATCHES", "PatchError", "apply_patches", "patch_set_hash"]


class PatchError(RuntimeError):
    """A patch no longer applies to the MinkowskiEngine source."""


@dataclass(frozen=True)
class Edit:
    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    edits: tuple[Edit, ...]
    cuda_only: bool = False
    tags: tuple[str, ...] = field(default=())


def _abc_import(path: str, old: str, new: str) -> Edit:
    return Edit(path, old, new)


_THRUST_INCLUDES = "".join(
    f"#include <thrust/{h}.h>\n"
    for h in (
        "execution_policy",
        "unique",
        "remove",
        "reduce",
        "sort",
        "sequence",
        "scan",
        "for_each",
        "transform",
        "count",
        "fill",
        "copy",
        "functional",
    )
)


def _thrust_edit(path: str, anchor: str) -> Edit:
    """Insert explicit thrust includes before ``anchor`` (the file's first include)."""
    return Edit(path, anchor, "// sparkme: explicit thrust includes\n" + _THRUST_INCLUDES + anchor)


PATCHES: tuple[Patch, ...] = (
    Patch(
        name="python310-collections-abc",
        why="Python >= 3.10 removed the ABC aliases from `collections`.",
        edits=(
            _abc_import(
                "MinkowskiEngine/MinkowskiCommon.py",
                "from collections import Sequence\n",
                "from collections.abc import Sequence\n",
            ),
            _abc_import(
                "MinkowskiEngine/MinkowskiCoordinateManager.py",
                "from collections import Sequence\n",
                "from collections.abc import Sequence\n",
            ),
            _abc_import(
                "MinkowskiEngine/MinkowskiKernelGenerator.py",
                "from collections import Sequence, namedtuple\n",
                "from collections import namedtuple\nfrom collections.abc import Sequence\n",
            ),
            _abc_import(
                "MinkowskiEngine/MinkowskiTensorField.py",
                "from collections import Sequence\n",
                "from collections.abc import Sequence\n",
            ),
            _abc_import(
                "MinkowskiEngine/utils/quantization.py",
                "from collections import Sequence\n",
                "from collections.abc import Sequence\n",
            ),
        ),
    ),
    Patch(
        name="setup-no-side-effects",
        why="setup.py uninstalls MinkowskiEngine from the running environment and deletes "
        "build/ when it starts; a build must not touch the installed environment.",
        edits=(
            Edit(
                "setup.py",
                'run_command("rm", "-rf", "build")\nrun_command("pip", "uninstall", "MinkowskiEngine", "-y")\n',
                "# sparkme: setup.py no longer uninstalls MinkowskiEngine or removes build/\n",
            ),
        ),
    ),
    Patch(
        name="cuda-explicit-thrust-includes",
        why="CUDA 12/13's CCCL no longer pulls thrust headers in transitively.",
        cuda_only=True,
        edits=(
            _thrust_edit("src/convolution_kernel.cuh", '#include "gpu.cuh"\n#include "kernel_map.cuh"\n'),
            _thrust_edit(
                "src/coordinate_map_gpu.cu",
                '#include "coordinate_map_functors.cuh"\n#include "coordinate_map_gpu.cuh"\n',
            ),
            _thrust_edit("src/spmm.cu", '#include "gpu.cuh"\n#include "math_functions.cuh"\n'),
            _thrust_edit("src/3rdparty/concurrent_unordered_map.cuh", "#include <cudf/detail/nvtx/ranges.hpp>\n"),
            _thrust_edit(
                "src/pooling_max_kernel.cu", "#include <thrust/execution_policy.h>\n#include <thrust/fill.h>\n"
            ),
            _thrust_edit("src/broadcast_kernel.cu", '#include "allocators.cuh"\n#include "broadcast_kernel.cuh"\n'),
            _thrust_edit("src/kernel_map.cuh", '#include "3rdparty/hash/hash_allocator.cuh"\n'),
        ),
    ),
    Patch(
        name="cuda-cccl3-unary-function",
        why="CCCL 3 removed thrust::unary_function; declare the typedefs directly.",
        cuda_only=True,
        edits=(
            Edit(
                "src/coordinate_map_functors.cuh",
                "struct find_coordinate\n"
                "    : public thrust::unary_function<uint32_t,\n"
                "                                    thrust::pair<uint32_t, uint32_t>> {\n",
                "struct find_coordinate {\n"
                "  using argument_type = uint32_t;\n"
                "  using result_type = thrust::pair<uint32_t, uint32_t>;\n",
            ),
        ),
    ),
    Patch(
        name="cuda-unique-ptr-map",
        why="newer nvcc + libstdc++ find std::__to_address ambiguous for shared_ptr<map_type>.",
        cuda_only=True,
        edits=(
            Edit(
                "src/coordinate_map_gpu.cuh",
                "  std::shared_ptr<map_type> m_map;\n",
                "  std::unique_ptr<map_type, std::function<void(map_type *)>> m_map;\n",
            ),
            Edit(
                "src/coordinate_map_gpu.cuh",
                '#include "3rdparty/concurrent_unordered_map.cuh"\n',
                '#include <functional>\n#include <memory>\n\n#include "3rdparty/concurrent_unordered_map.cuh"\n',
            ),
        ),
    ),
    Patch(
        name="cuda13-mem-prefetch",
        why="CUDA 13 changed cudaMemPrefetchAsync to take a cudaMemLocation and flags.",
        cuda_only=True,
        edits=(
            Edit(
                "src/3rdparty/concurrent_unordered_map.cuh",
                "#include <cudf/detail/nvtx/ranges.hpp>\n",
                "#include <cudf/detail/nvtx/ranges.hpp>\n"
                "#if defined(CUDART_VERSION) && CUDART_VERSION >= 13000\n"
                "#define SPARKME_PREFETCH(ptr, n, dev, stream) \\\n"
                "  cudaMemPrefetchAsync(ptr, n, cudaMemLocation{cudaMemLocationTypeDevice, dev}, 0, stream)\n"
                "#else\n"
                "#define SPARKME_PREFETCH(ptr, n, dev, stream) cudaMemPrefetchAsync(ptr, n, dev, stream)\n"
                "#endif\n",
            ),
            Edit(
                "src/3rdparty/concurrent_unordered_map.cuh",
                "      CUDA_TRY(\n"
                "        cudaMemPrefetchAsync(m_hashtbl_values, m_capacity * sizeof(value_type), dev_id, stream));\n"
                "    }\n"
                "    CUDA_TRY(cudaMemPrefetchAsync(this, sizeof(*this), dev_id, stream));\n",
                "      CUDA_TRY(\n"
                "        SPARKME_PREFETCH(m_hashtbl_values, m_capacity * sizeof(value_type), dev_id, stream));\n"
                "    }\n"
                "    CUDA_TRY(SPARKME_PREFETCH(this, sizeof(*this), dev_id, stream));\n",
            ),
            Edit(
                "src/3rdparty/concurrent_unordered_map.cuh",
                "        CUDA_TRY(\n"
                "          cudaMemPrefetchAsync(m_hashtbl_values, m_capacity * sizeof(value_type), dev_id, stream));\n",
                "        CUDA_TRY(\n"
                "          SPARKME_PREFETCH(m_hashtbl_values, m_capacity * sizeof(value_type), dev_id, stream));\n",
            ),
        ),
    ),
    Patch(
        name="cuda-spmm-aten-tensor",
        why="ATen's CUDA headers need the Tensor definition first with torch >= 2.4.",
        cuda_only=True,
        edits=(
            Edit(
                "src/spmm.cu",
                "#include <ATen/cuda/CUDAContext.h>\n",
                "#include <ATen/core/Tensor.h>\n#include <ATen/cuda/CUDAContext.h>\n",
            ),
        ),
    ),
    Patch(
        name="cuda-setup-nvtx-and-cccl",
        why="the vendored cuDF nvtx3 header clashes with CUB's (NVTX_DISABLE); CUDA 13 keeps "
        "thrust/cub under include/cccl, which g++ compiling the .cpp sources must see.",
        cuda_only=True,
        edits=(
            Edit(
                "setup.py",
                '    include_dirs=[str(SRC_PATH), str(SRC_PATH / "3rdparty"), *include_dirs],\n',
                '    include_dirs=[str(SRC_PATH), str(SRC_PATH / "3rdparty"), *include_dirs,\n'
                '                  *[d for d in [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), '
                '"include", "cccl")] if os.path.isdir(d)]],\n',
            ),
            Edit(
                "setup.py",
                '        ["pybind/minkowski.cu"],\n        [],\n',
                '        ["pybind/minkowski.cu"],\n        ["-DNVTX_DISABLE"],\n',
            ),
        ),
    ),
)


def _edits_for(cuda: bool) -> list[tuple[Patch, Edit]]:
    return [(p, e) for p in PATCHES if cuda or not p.cuda_only for e in p.edits]


def patch_set_hash(cuda: bool) -> str:
    """Short sha256 over exactly the edits a CPU (or CUDA) build applies."""
    payload = [(p.name, e.path, e.old, e.new) for p, e in _edits_for(cuda)]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def apply_patches(source_dir: Path, cuda: bool) -> list[str]:
    """Apply the patch set in place; return the edits made (empty when already applied).

    All edits are checked before any file is written, so a patch that no longer
    applies leaves the tree untouched.
    """
    source_dir = Path(source_dir)
    texts: dict[Path, str] = {}
    changed: list[str] = []
    for patch, edit in _edits_for(cuda):
        path = source_dir / edit.path
        if not path.is_file():
            raise PatchError(f"patch {patch.name!r}: file {edit.path} is missing from {source_dir}")
        text = texts.get(path, path.read_text())
        if edit.new in text:
            continue
        if edit.old not in text:
            raise PatchError(
                f"patch {patch.name!r} no longer applies to {edit.path}: "
                f"expected text not found: {edit.old.strip()[:80]!r}"
            )
        texts[path] = text.replace(edit.old, edit.new, 1)
        changed.append(f"{patch.name}: {edit.path}")
    for path, text in texts.items():
        path.write_text(text)
    return changed
