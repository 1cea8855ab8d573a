"""The sparse encoder leaves the caller's torch thread count as it found it.

MinkowskiEngine sets OpenMP's thread count when it builds a coordinate manager (to its own
default, the CPU count, unless ``OMP_NUM_THREADS`` is set), which would silently change
``torch.get_num_threads()`` for everything after the first sparse forward. Checked in a fresh
process with ``OMP_NUM_THREADS`` unset, since an already-set variable hides the effect.
"""

from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = """
import timm, torch
import sparkme

encoder = sparkme.sparsify(timm.create_model("resnet18", pretrained=False), backend="gather")
images = torch.randn(2, 3, 64, 64)
visible = torch.tensor([[[[1, 0], [1, 1]]], [[[0, 1], [1, 0]]]], dtype=torch.bool)
for threads in (1, 3, 1):
    torch.set_num_threads(threads)
    sum(f.mean() for f in encoder(images, visible)).backward()
    print(threads, torch.get_num_threads())
"""


def test_sparse_forward_and_backward_keep_the_callers_thread_count():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pairs = [line.split() for line in result.stdout.strip().splitlines()]
    assert pairs == [["1", "1"], ["3", "3"], ["1", "1"]], result.stdout
