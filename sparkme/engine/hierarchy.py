"""Which modules' outputs are the encoder's hierarchical features (stages), with channels and strides.

Sources, in order: the user's ``stages=`` (module names), timm's ``feature_info`` contract
(entries with reduction >= 4), else a dense probe forward that picks, for each reduction >= 4,
the last module whose output has that reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Stage", "find_stages", "resolve_module", "encoder_forward", "input_geometry", "PROBE_SIZE"]

PROBE_SIZE = 256  # side of the probe's blank image (volumes: PROBE_SIZE_3D, to keep the probe small)
PROBE_SIZE_3D = 64


def input_geometry(model: nn.Module) -> tuple[int, int]:
    """``(spatial dims, input channels)`` of a CNN, read from its first convolution (2, 3 without one)."""
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            return 3, module.in_channels
        if isinstance(module, nn.Conv2d):
            return 2, module.in_channels
    return 2, 3


@dataclass(frozen=True)
class _ProbeInput:
    dims: int
    channels: int

    @property
    def size(self) -> int:
        return PROBE_SIZE_3D if self.dims == 3 else PROBE_SIZE

    def describe(self) -> str:
        return "x".join(str(n) for n in (1, self.channels, *(self.size,) * self.dims))

    def is_map(self, value: object) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() == self.dims + 2

    def reduction(self, shape: tuple[int, ...]) -> int | None:
        """The map's reduction when every side of ``shape[2:]`` divides the probe size equally, else None."""
        sides = set(shape[2:])
        side = shape[2]
        if len(sides) != 1 or side <= 1 or self.size % side:
            return None
        return self.size // side


@dataclass(frozen=True)
class Stage:
    """A feature map the encoder returns: the module producing it, its channels and stride."""

    name: str
    channels: int
    stride: int


def resolve_module(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Find a stage module by name; timm's ``features_only`` nets flatten ``stages.1`` to ``stages_1``."""
    for candidate in (name, name.replace(".", "_")):
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            continue
    names = [n for n, _ in model.named_modules() if n]
    raise ValueError(f"stage module {name!r} not found in {type(model).__name__}; some module names: {names[:20]}")


def encoder_forward(model: nn.Module) -> Callable[[object], object]:
    """The forward that runs the backbone: timm's ``forward_features`` when present, else ``forward``."""
    features = getattr(model, "forward_features", None)
    return features if callable(features) else model


def _feature_info(model: nn.Module) -> list[dict] | None:
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    if not dicts or not all(isinstance(d, dict) and {"module", "num_chs", "reduction"} <= d.keys() for d in dicts):
        return None
    return dicts


class _ProbeDone(BaseException):
    """Raised once every requested stage has run: the probe needs nothing after them. A
    ``BaseException`` so that a model's own ``except Exception`` cannot swallow it."""


def _probe(
    model: nn.Module, names: Sequence[str] | None, probe: _ProbeInput
) -> list[tuple[int, str, tuple[int, ...] | None]]:
    """Dense forward of a blank image (or volume); records ``(order, name, shape)`` of every module call
    in order of completion (``shape`` None when the output is not a spatial map).

    With ``names`` the probe stops once they have all run. One failure is expected and ends the
    probe: a head module fed flat features (a classifier built for another input size) raising a
    ``RuntimeError``. Any other failure is reported.
    """
    records: list[tuple[int, str, tuple[int, ...] | None]] = []
    running: list[tuple[str, bool]] = []  # (name, fed a spatial map) of the modules entered, not yet left
    pending = set(names) if names is not None else None
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def enter(_module, inputs, name=name):
            running.append((name, any(probe.is_map(i) for i in inputs)))

        def leave(_module, _inputs, output, name=name):
            running.pop()
            records.append((len(records), name, tuple(output.shape) if probe.is_map(output) else None))
            if pending is not None and probe.is_map(output):
                pending.discard(name)
                if not pending:
                    raise _ProbeDone

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        _dense_forward(model, probe)
    except _ProbeDone:
        pass
    except Exception as err:
        failing = running[-1] if running else None
        in_head = failing is not None and not failing[1] and isinstance(err, RuntimeError)
        if not (records and in_head):
            where = f" in module {failing[0]!r}" if failing else ""
            raise ValueError(
                f"a dense probe forward of {type(model).__name__} on a {probe.describe()} input failed"
                f"{where} ({type(err).__name__}: {err}); pass stages=[module names]"
            ) from err
    finally:
        for handle in handles:
            handle.remove()
    return records


def _dense_forward(model: nn.Module, probe: _ProbeInput) -> None:
    """One eval-mode, no-grad forward of a blank probe input; training flags restored."""
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else "cpu"
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            shape = (1, probe.channels, *(probe.size,) * probe.dims)
            encoder_forward(model)(torch.zeros(shape, dtype=dtype, device=device))
    finally:
        for module, training in modes.items():
            module.train(training)


def find_stages(model: nn.Module, stages: Sequence[str] | None = None) -> tuple[list[Stage], list[str]]:
    """``(stages, fired)``: the stages in execution order, and (for probed models) the names of the
    modules that ran up to the last stage (None-equivalent empty list when not probed)."""
    info = _feature_info(model)
    if stages is None and info is not None:
        picked = [d for d in info if d["reduction"] >= 4]
        if not picked:
            raise ValueError(f"{type(model).__name__}.feature_info has no entry with reduction >= 4")
        return [
            Stage(resolve_module(model, d["module"])[0], int(d["num_chs"]), int(d["reduction"])) for d in picked
        ], []
    if stages is not None and info is not None:
        by_name = {resolve_module(model, d["module"])[0]: d for d in info}
        resolved = [resolve_module(model, s)[0] for s in stages]
        if all(name in by_name for name in resolved):
            return [Stage(n, int(by_name[n]["num_chs"]), int(by_name[n]["reduction"])) for n in resolved], []
    return _probed_stages(model, stages, _ProbeInput(*input_geometry(model)))


def _probed_stages(model: nn.Module, stages: Sequence[str] | None, probe: _ProbeInput) -> tuple[list[Stage], list[str]]:
    """The stages found by a dense probe forward: the named ones, else the last module per reduction >= 4."""
    if stages is not None:
        resolved = [resolve_module(model, s)[0] for s in stages]
        records = _probe(model, resolved, probe)
        last = {name: (order, shape) for order, name, shape in records if shape is not None}
        missing = [name for name in resolved if name not in last]
        if missing:
            raise ValueError(
                f"stage modules {missing} produced no {probe.dims + 2}-d map of the input in a dense forward "
                f"of {type(model).__name__}"
            )
        chosen = sorted((last[name][0], name, last[name][1]) for name in resolved)
    else:
        records = _probe(model, None, probe)
        by_reduction: dict[int, tuple[int, str, tuple[int, ...]]] = {}
        for order, name, shape in records:
            reduction = probe.reduction(shape) if shape is not None else None
            if reduction is not None and reduction >= 4:
                by_reduction[reduction] = (order, name, shape)
        if not by_reduction:
            raise ValueError(
                f"could not find downsampling stages in {type(model).__name__}; pass stages=[module names]"
            )
        chosen = sorted(by_reduction.values())
    last_order = chosen[-1][0]
    fired = sorted({name for order, name, _ in records if order <= last_order})
    result = [Stage(name, shape[1], probe.size // shape[2]) for _, name, shape in chosen]
    strides = [s.stride for s in result]
    if strides != sorted(strides):
        raise ValueError(f"stages {[s.name for s in result]} do not run in order of increasing stride {strides}")
    return result, fired
