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
