"""Choosing which layers of a model are compared, in forward execution order.

A module's depth is the number of dot-separated parts of its qualified name from
``named_modules()`` (``layer1.0.conv1`` has depth 3). A selection at depth ``d`` keeps
the modules at depth ``d`` plus the leaf modules shallower than ``d``; depth ``-1``
keeps every leaf. The selected modules become layers through a traced forward pass:
one layer per call, ordered by when each call returns, so that rows of a CKA matrix
follow the computation and not the order of definition.
"""

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "TRACE_EXAMPLES",
    "CallRecord",
    "LayerInfo",
    "LayerSelection",
    "first_float_tensor",
    "kernel_sizes_present",
    "layers_of_modules",
    "max_depth",
    "module_depth",
    "restore_training_state",
    "select_layers",
    "trace_calls",
    "training_state",
    "union_of_layers",
]

TRACE_EXAMPLES = 2
"""Examples in the trial forward pass that orders layers: with two, an output whose first
dimension is not the batch can be detected."""


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One compared layer: one call of one module during a forward pass.

    Attributes:
        name: label on the heatmap axes, the module's qualified name, with ``#k`` for the
            k-th call when the module runs more than once per forward pass.
        module_name: qualified name from ``named_modules()``.
        call: 1-based index of the call within one forward pass.
        module_type: class name of the module, such as ``Conv2d``.
    """

    name: str
    module_name: str
    call: int
    module_type: str


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """One module call seen while tracing a forward pass.

    Attributes:
        module_name: qualified name of the module.
        call: 1-based index of the call within the forward pass.
        output_shape: shape of the first floating-point tensor of the output, or None
            when the output has none.
    """

    module_name: str
    call: int
    output_shape: tuple[int, ...] | None


@dataclasses.dataclass
class LayerSelection:
    """Layers chosen for one model at one depth, with what was left out and why.

    Attributes:
        layers: compared layers in execution order.
        dropped: ``{layer or module name: reason}`` for selected modules that give no
            usable layer: they never ran, or their output has no tensor to compare.
        depth: depth actually used: the requested one, or the model's deepest level
            when the request was deeper; -1 for leaves and for ``conv_only``.
        expanded: ``{container name: reason}`` for ModuleLists and ModuleDicts that never
            run themselves and were replaced by their children.
        removed_output: name of the output layer removed by ``remove_output_layer``.
    """

    layers: list[LayerInfo]
    dropped: dict[str, str]
    depth: int
    expanded: dict[str, str] = dataclasses.field(default_factory=dict)
    removed_output: str | None = None


def module_depth(qualified_name: str) -> int:
    """Return the depth of a module from its qualified name; the root has depth 0."""
    return len(qualified_name.split(".")) if qualified_name else 0


def max_depth(model: nn.Module) -> int:
    """Return the depth of the deepest module of ``model``."""
    return max(module_depth(name) for name, _ in model.named_modules())


def first_float_tensor(output: object) -> torch.Tensor | None:
    """Return the first floating-point tensor in a module output, searching depth-first.

    Tuples, lists and dicts (in insertion order) are searched; anything else without a
    floating-point tensor gives None.
    """
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_float_tensor(item)
            if found is not None:
                return found
    return None


def trace_calls(model: nn.Module, inputs: torch.Tensor) -> list[CallRecord]:
    """Run one forward pass and record every module call in the order calls return.

    The model runs in eval mode under ``torch.inference_mode()``; every module's training flag is
    restored and every hook removed, also when the forward pass raises.

    Args:
        model: the model to trace; its root module is not recorded.
        inputs: ``(n, ...)`` input batch already on the model's device.

    Returns:
        One record per module call, in the order the calls returned.
    """
    records: list[CallRecord] = []
    call_counts: dict[str, int] = {}

    def make_hook(module_name: str):
        def hook(module, args, output):
            call_counts[module_name] = call_counts.get(module_name, 0) + 1
            tensor = first_float_tensor(output)
            shape = tuple(tensor.shape) if tensor is not None else None
            records.append(CallRecord(module_name, call_counts[module_name], shape))

        return hook

    training_flags = training_state(model)
    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        model.eval()
        with torch.inference_mode():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        restore_training_state(training_flags)
    return records


def training_state(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Return every module's training flag, so that a frozen submodule can be restored."""
    return [(module, module.training) for module in model.modules()]


def restore_training_state(state: list[tuple[nn.Module, bool]]) -> None:
    """Set each module's training flag back to what ``training_state`` returned."""
    for module, training in state:
        module.training = training


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_convolution_in_range(module: nn.Module, kernel_range: tuple[int, int]) -> bool:
    if not isinstance(module, nn.modules.conv._ConvNd):
        return False
    low, high = kernel_range
    return all(low <= size <= high for size in module.kernel_size)


def kernel_sizes_present(model: nn.Module) -> list[tuple[int, ...]]:
    """Return the distinct kernel sizes of the model's convolutions, sorted."""
    sizes = {
        tuple(module.kernel_size)
        for module in model.modules()
        if isinstance(module, nn.modules.conv._ConvNd)
    }
    return sorted(sizes)


def _candidate_modules(
    model: nn.Module,
    depth: int,
    conv_only: bool,
    kernel_range: tuple[int, int],
    include_parameter_free: bool,
) -> list[str]:
    """Return the qualified names of the modules a selection requests, in definition order."""
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = _is_leaf(module)
        if conv_only:
            chosen = leaf and _is_convolution_in_range(module, kernel_range)
        elif depth == -1:
            chosen = leaf
        else:
            level = module_depth(name)
            chosen = level == depth or (leaf and level < depth)
        if chosen and (include_parameter_free or _owns_parameters(module)):
            names.append(name)
    return names


def _expand_uncalled_containers(
    model: nn.Module, names: list[str], called: set[str], include_parameter_free: bool
) -> tuple[list[str], dict[str, str]]:
    """Replace each ModuleList or ModuleDict that never runs by its children, recursively.

    Such containers only hold modules that their parent calls one by one, so the depth
    they sit at would otherwise select nothing there.
    """
    modules = dict(model.named_modules())
    expanded: list[str] = []
    replaced: dict[str, str] = {}

    def visit(name: str) -> None:
        module = modules[name]
        if name in called or not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            expanded.append(name)
            return
        replaced[name] = f"{type(module).__name__} that never runs itself: its children are compared"
        for child_name, child in module.named_children():
            if include_parameter_free or _owns_parameters(child):
                visit(f"{name}.{child_name}")

    for name in names:
        visit(name)
    return expanded, replaced


def _batch_dimension_mismatch(shape: tuple[int, ...], batch_size: int) -> bool:
    return len(shape) == 0 or shape[0] != batch_size


def layers_of_modules(
    model: nn.Module, calls: Sequence[CallRecord], module_names: Iterable[str], batch_size: int
) -> tuple[list[LayerInfo], dict[str, str]]:
    """Turn the calls of the named modules into layers, in execution order.

    Args:
        model: the traced model.
        calls: the trace of one forward pass, from ``trace_calls``.
        module_names: qualified names of the modules to keep.
        batch_size: number of examples in the traced batch.

    Returns:
        The layers, one per call, and ``{name: reason}`` for each named module or call
        that cannot be compared: it never ran, its output has no floating-point tensor,
        or that tensor does not start with the batch dimension.
    """
    wanted = list(dict.fromkeys(module_names))
    wanted_set = set(wanted)
    call_totals: dict[str, int] = {}
    for record in calls:
        if record.module_name in wanted_set:
            call_totals[record.module_name] = record.call

    layers: list[LayerInfo] = []
    dropped: dict[str, str] = {}
    modules = dict(model.named_modules())
    for record in calls:
        if record.module_name not in wanted_set:
            continue
        name = record.module_name
        if call_totals[name] > 1:
            name = f"{name}#{record.call}"
        if record.output_shape is None:
            dropped[name] = "output contains no floating-point tensor"
        elif _batch_dimension_mismatch(record.output_shape, batch_size):
            dropped[name] = (
                f"output shape {list(record.output_shape)} does not start with the batch "
                f"dimension {batch_size}"
            )
        else:
            module_type = type(modules[record.module_name]).__name__
            layers.append(LayerInfo(name, record.module_name, record.call, module_type))

    for name in wanted:
        if name not in call_totals:
            dropped[name] = "never ran during the forward pass"
    return layers, dropped


def select_layers(
    model: nn.Module,
    calls: Sequence[CallRecord],
    batch_size: int,
    depth: int = -1,
    conv_only: bool = False,
    kernel_range: tuple[int, int] = (3, 100),
    include_parameter_free: bool = False,
    remove_output_layer: bool = True,
) -> LayerSelection:
    """Choose the layers of ``model`` to compare, in execution order.

    Args:
        model: the model whose modules are selected.
        calls: the trace of one forward pass, from ``trace_calls``.
        batch_size: number of examples in the traced batch; a layer whose output does
            not start with that dimension cannot be compared and is dropped.
        depth: ``-1`` for leaf modules, or ``d >= 1`` for the modules at depth ``d`` plus
            shallower leaves. A depth beyond the deepest module is clamped to it, and
            the selection's ``depth`` is the one used.
        conv_only: keep only leaf convolutions whose every kernel dimension lies in
            ``kernel_range``; ``depth`` and ``remove_output_layer`` are then ignored.
        kernel_range: inclusive ``(min, max)`` kernel size for ``conv_only``.
        include_parameter_free: also select modules without parameters (activations,
            pooling).
        remove_output_layer: drop the last executed layer, normally the classifier.

    Returns:
        The selection; its ``layers`` may be empty and the caller decides what that means.
    """
    if conv_only:
        depth = -1
    elif depth != -1:
        depth = min(depth, max_depth(model))

    candidates = _candidate_modules(model, depth, conv_only, kernel_range, include_parameter_free)
    called = {record.module_name for record in calls}
    candidates, replaced = _expand_uncalled_containers(model, candidates, called, include_parameter_free)
    layers, dropped = layers_of_modules(model, calls, candidates, batch_size)

    removed_output = None
    if remove_output_layer and not conv_only and layers:
        removed_output = layers.pop().name
    return LayerSelection(layers, dropped, depth, replaced, removed_output)


def union_of_layers(
    calls: Sequence[CallRecord], selections: Iterable[LayerSelection]
) -> list[LayerInfo]:
    """Merge selections of one model into one list of distinct layers in execution order.

    Args:
        calls: the trace the selections were made from.
        selections: selections of the same model, for instance at several depths.
    """
    position = {(record.module_name, record.call): index for index, record in enumerate(calls)}
    distinct = {
        (layer.module_name, layer.call): layer
        for selection in selections
        for layer in selection.layers
    }
    return sorted(distinct.values(), key=lambda layer: position[(layer.module_name, layer.call)])
