"""SparseEncoder and ``sparsify``: any dense CNN run on visible sites only, with its dense weights.

The encoder keeps a deep copy of the dense model, unchanged: same modules, same parameter names
and layouts, so ``dense_state_dict()`` is its ``state_dict()`` and round trips are bitwise. What
changes is the activation: a :class:`SparseMap` flows through the model's own forward code and
every torch function the modules call runs on the active sites only. Forward hooks on the stage
modules collect the hierarchical features and stop the forward after the last one (the head
never runs).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from . import layers  # noqa: F401  (registers the sparse implementations)
from .backends import DEFAULT_BACKEND, get_backend, supports_autocast
from .check import check_modules
from .hierarchy import Stage, encoder_forward, find_stages, input_geometry
from .layers.sync_bn import adopt_sync_batchnorms
from .sites import visible_to_pixels
from .sparse_map import SparseContext, SparseMap

__all__ = ["SparseEncoder", "sparsify"]


class _StopEncoding(BaseException):
    """Raised by the last stage's hook: the rest of the model (the head) must not run. A
    ``BaseException`` so that a model's own ``except Exception`` cannot swallow it."""


@contextlib.contextmanager
def _naming_modules(model: nn.Module, ctx: SparseContext):
    """During one forward: keep ``ctx.module_stack`` on the running module's path and type, so an
    error can name it. Module-global hooks live only as long as this context."""
    labels = {id(module): f"{name or '<root>'} ({type(module).__name__})" for name, module in model.named_modules()}

    def enter(module: nn.Module, args: tuple) -> None:
        label = labels.get(id(module))
        if label is not None:
            ctx.module_stack.append(label)

    def leave(module: nn.Module, args: tuple, output) -> None:
        if id(module) in labels and ctx.module_stack:
            ctx.module_stack.pop()

    handles = [
        module_hooks.register_module_forward_pre_hook(enter),
        module_hooks.register_module_forward_hook(leave, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _collecting(model: nn.Module, stages: Sequence[Stage], outputs: dict[int, SparseMap]):
    """During one forward: store each stage's output in ``outputs``; stop after the last stage."""

    def collect(index: int, stage: Stage, output) -> None:
        if not isinstance(output, SparseMap):
            raise RuntimeError(f"stage {stage.name} returned {type(output).__name__}, not a sparse map")
        outputs[index] = output.with_features(output.features)  # later in-place ops must not reach it
        if len(outputs) == len(stages):
            raise _StopEncoding

    handles = [
        model.get_submodule(stage.name).register_forward_hook(
            lambda _module, _args, output, index=index, stage=stage: collect(index, stage, output)
        )
        for index, stage in enumerate(stages)
    ]
    try:
        yield
    except _StopEncoding:
        pass
    finally:
        for handle in handles:
            handle.remove()


class SparseEncoder(nn.Module):
    """A dense CNN that encodes only the visible pixels of masked images (see :func:`sparsify`).

    ``encoder(images, visible)`` returns the hierarchical features as dense tensors
    ``[B, C_i, H / s_i, W / s_i]`` with zeros at hidden sites (volumes: ``[B, C, D, H, W]`` in,
    ``[B, C_i, D / s_i, H / s_i, W / s_i]`` out, for a CNN built from ``Conv3d``); ``forward_sparse``
    returns MinkowskiEngine ``SparseTensor``s. ``feature_channels``, ``feature_strides``,
    ``downsample_ratio`` (the patch side), ``norm_kind`` ("bn" or "ln"), ``spatial_dims`` (2 or 3),
    ``in_channels`` and ``model_name`` describe it to the SparK model.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[Stage],
        backend: str = DEFAULT_BACKEND,
        model_name: str | None = None,
        norm_kind: str = "bn",
    ):
        super().__init__()
        self.model = model
        self.stages = list(stages)
        self.feature_channels = [s.channels for s in self.stages]
        self.feature_strides = [s.stride for s in self.stages]
        self.downsample_ratio = self.feature_strides[-1]
        self.model_name = model_name
        self.norm_kind = norm_kind
        self.spatial_dims, self.in_channels = input_geometry(model)
        self.set_backend(backend)

    def set_backend(self, name: str) -> None:
        """Switch the sparse convolution backend ("gather": sparkme's fast path, the default;
        "minkowski": MinkowskiEngine's stock kernels)."""
        get_backend(name)
        self.backend = name

    def extra_repr(self) -> str:
        return (
            f"model_name={self.model_name}, channels={self.feature_channels}, strides={self.feature_strides}, "
            f"backend={self.backend!r}"
        )

    # ---- forward (eager only: torch.compile runs it as a graph break) ------------------------
    @torch.compiler.disable
    def forward_maps(self, images: torch.Tensor, visible: torch.Tensor) -> list[SparseMap]:
        """The stage outputs as :class:`SparseMap` (features, sites, stride)."""
        first = self._input_map(images, visible)
        # the gather backend computes in the caller's autocast dtype; stock ME kernels need fp32
        precision = (
            contextlib.nullcontext()
            if supports_autocast(self.backend)
            else torch.autocast(images.device.type, enabled=False)
        )
        outputs: dict[int, SparseMap] = {}
        with _collecting(self.model, self.stages, outputs), _naming_modules(self.model, first.ctx), precision:
            encoder_forward(self.model)(first)
        missing = [s.name for i, s in enumerate(self.stages) if i not in outputs]
        if missing:
            raise RuntimeError(f"stages {missing} never ran in {type(self.model).__name__}'s forward")
        return [outputs[i] for i in range(len(self.stages))]

    def _input_map(self, images: torch.Tensor, visible: torch.Tensor) -> SparseMap:
        """The visible pixels of ``images`` as the first sparse map (coordinates from the mask)."""
        import MinkowskiEngine as ME

        dims = self.spatial_dims
        layout = "[B, C, D, H, W]" if dims == 3 else "[B, C, H, W]"
        if not isinstance(images, torch.Tensor) or images.dim() != dims + 2 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor {layout}, got {getattr(images, 'shape', images)!r}")
        batch, size = images.shape[0], tuple(images.shape[2:])
        ratio = self.downsample_ratio
        if any(side % ratio for side in size):
            raise ValueError(
                f"input size {'x'.join(str(side) for side in size)} is not a multiple of the encoder's "
                f"downsample ratio {ratio}; resize or crop to a multiple of {ratio}"
            )
        visible = visible_to_pixels(visible.to(images.device), size)
        if visible.shape[0] != batch:
            raise ValueError(f"visible has batch {visible.shape[0]}, images have {batch}")
        map_type = ME.CoordinateMapType.CUDA if images.is_cuda else ME.CoordinateMapType.CPU
        # ME sets OpenMP's thread count to its num_threads (default: the CPU count) when it builds a
        # manager; passing the caller's count leaves torch.get_num_threads() as the caller set it
        manager = ME.CoordinateManager(D=dims, num_threads=torch.get_num_threads(), coordinate_map_type=map_type)
        coords = visible.nonzero().to(torch.int32).contiguous()
        if coords.shape[0] == 0:
            raise ValueError("the mask hides every pixel of every image; nothing to encode")
        key, (unique, _) = manager.insert_and_map(coords, tensor_stride=[1] * dims, string_id="")
        rows = coords.long().index_select(0, unique.long().to(coords.device))
        features = images.permute(0, *range(2, dims + 2), 1)[rows.unbind(1)]
        ctx = SparseContext(manager, batch, size, get_backend(self.backend), images.device)
        return SparseMap(features, key, (1,) * dims, ctx)

    @torch.compiler.disable
    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        """Hierarchical features as dense ``[B, C_i, H_i, W_i]`` (volumes ``[B, C_i, D_i, H_i, W_i]``) tensors,
        zeros at hidden sites."""
        return [m.dense() for m in self.forward_maps(images, visible)]

    @torch.compiler.disable
    def forward_sparse(self, images: torch.Tensor, visible: torch.Tensor) -> list:
        """Hierarchical features as MinkowskiEngine ``SparseTensor``s (one coordinate manager)."""
        return [m.sparse_tensor() for m in self.forward_maps(images, visible)]

    # ---- weights -----------------------------------------------------------------------------
    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The dense model's weights, keyed exactly like the source model (copies)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_dense_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load weights keyed like the source dense model."""
        return self.model.load_state_dict(state_dict, strict=strict)


def _model_name(model: nn.Module) -> str | None:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return None


def _scope(model: nn.Module, stages: Sequence[Stage], fired: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The modules that run before the last stage ends (the head is never run, so never checked)."""
    named = list(model.named_modules())
    if fired:
        ran = set(fired)
        return [(n, m) for n, m in named if not n or n in ran]
    last = stages[-1].name
    end = next(i for i, (n, _) in enumerate(named) if n == last)
    while end + 1 < len(named) and named[end + 1][0].startswith(last + "."):
        end += 1
    return named[: end + 1]


def _freeze_unrun(model: nn.Module, scope: Sequence[tuple[str, nn.Module]]) -> None:
    """Parameters only modules outside ``scope`` use (a classifier head) can get no gradient: freeze them,
    so optimizers skip them and DDP needs no unused-parameter search. Their values stay in the state dict."""
    used = {id(p) for _, module in scope for p in module.parameters(recurse=False)}
    for param in model.parameters():
        if id(param) not in used:
            param.requires_grad_(False)


def sparsify(cnn: nn.Module, stages: Sequence[str] | None = None, backend: str = DEFAULT_BACKEND) -> SparseEncoder:
    """Turn a dense CNN into a :class:`SparseEncoder` that computes only at visible sites.

    ``cnn`` is a timm model (``features_only`` or not) or any ``nn.Module``; it is deep-copied
    and left untouched. ``stages`` names the modules whose outputs are the hierarchical features
    (default: timm ``feature_info`` entries with reduction >= 4, else found by a dense probe).
    Raises :class:`UnsupportedLayerError` naming every module that cannot keep sparse semantics.
    """
    if not isinstance(cnn, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(cnn).__name__}")
    get_backend(backend)
    model = copy.deepcopy(cnn)
    adopt_sync_batchnorms(model)
    found, fired = find_stages(model, stages)
    scope = _scope(model, found, fired)
    check_modules(scope)
    _freeze_unrun(model, scope)
    batch_statistics = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    has_bn = any(isinstance(m, batch_statistics) for _, m in scope)
    return SparseEncoder(model, found, backend, _model_name(model), "bn" if has_bn else "ln")
