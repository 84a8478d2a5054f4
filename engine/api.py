"""Comparing two models from Python: any ``nn.Module``, any batches of inputs.

Example, in a notebook::

    from engine import compare_models

    comparison = compare_models(base_model, finetuned_model, loader, depth=2)
    comparison.matrix            # (rows, columns) float64 tensor
    comparison.rows[:3]          # layer names of base_model, in execution order
    figure = comparison.plot()   # the heatmap the command line draws
    comparison.save("output")    # PNG, CSV and NPZ, as the command line writes them
"""

import dataclasses
import difflib
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from cka import KERNELS, MIN_EXAMPLES, MinibatchCKA, pack_grams
from models import TRACE_EXAMPLES, KernelRecorder, LayerInfo, layers_of_modules, select_layers, trace_calls
from plotting import plot_cka_heatmap

from .outputs import save_cka_matrix
from .run import full_float32_matmul, log_undefined_layers

__all__ = ["Comparison", "compare_models"]

@dataclasses.dataclass
class Comparison:
    """CKA between every layer of one model (rows) and every layer of another (columns).

    Attributes:
        matrix: ``(rows, columns)`` float64 CKA values; NaN where a layer is constant.
        rows: layer names of the first model, in execution order.
        columns: layer names of the second model, in execution order.
        name_x: name of the first model.
        name_y: name of the second model.
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"unbiased"`` or ``"biased"`` HSIC.
        examples: number of examples the values are computed from.
    """

    matrix: torch.Tensor
    rows: list[str]
    columns: list[str]
    name_x: str
    name_y: str
    kernel: str
    estimator: str
    examples: int

    @property
    def title(self) -> str:
        """Heatmap title: both models, the CKA type and the number of examples."""
        cka_type = "linear_CKA" if self.kernel == "linear" else "kernel_CKA"
        return (
            f"{self.name_y} vs {self.name_x}\n"
            f"{cka_type} ({self.estimator} HSIC), {self.examples} examples"
        )

    def plot(self, title: str | None = None):
        """Draw the heatmap the command line draws and return the matplotlib figure."""
        return plot_cka_heatmap(
            self.matrix.numpy(),
            self.rows,
            self.columns,
            title or self.title,
            row_axis=f"{self.name_x} layers",
            column_axis=f"{self.name_y} layers",
        )

    def save(self, folder: str, stem: str | None = None) -> list[str]:
        """Write the heatmap PNG, the CSV and the NPZ into ``folder``; return their paths."""
        import os

        os.makedirs(folder, exist_ok=True)
        stem = stem or re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.name_y}_vs_{self.name_x}")
        return save_cka_matrix(
            os.path.join(folder, stem),
            self.matrix.numpy(),
            self.rows,
            self.columns,
            self.name_x,
            self.name_y,
            self.title,
            metadata={"kernel": self.kernel, "estimator": self.estimator, "examples": self.examples},
        )


def _inputs_of(batch) -> torch.Tensor:
    """Return the input tensor of a batch: the batch itself or its first element."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        "expected each batch to be a tensor or a (inputs, ...) tuple or list, "
        f"got {type(batch).__name__}"
    )


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _layers_by_name(model: nn.Module, calls, names: Sequence[str], batch_size: int) -> list[LayerInfo]:
    """Resolve module names, or ``module#k`` call names, to layers in execution order."""
    module_names = [re.sub(r"#\d+$", "", name) for name in names]
    known = dict(model.named_modules())
    for name, module_name in zip(names, module_names):
        if module_name not in known or not module_name:
            close = difflib.get_close_matches(module_name, [key for key in known if key], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{type(model).__name__} has no module named {module_name!r}{hint}")

    layers, dropped = layers_of_modules(model, calls, module_names, batch_size)
    chosen = [layer for layer in layers if layer.name in names or layer.module_name in names]
    missing = [name for name in names if not any(name in (layer.name, layer.module_name) for layer in chosen)]
    if missing:
        reasons = "; ".join(f"{name}: {dropped.get(name, 'no such call')}" for name in missing)
        raise ValueError(f"cannot compare these layers of {type(model).__name__}: {reasons}")
    return chosen


def _choose_layers(model, inputs, names, depth, conv_only, kernel_range, include_parameter_free, remove_output_layer):
    trace_inputs = inputs[:TRACE_EXAMPLES]
    calls = trace_calls(model, trace_inputs)
    if names is not None:
        return _layers_by_name(model, calls, names, len(trace_inputs))
    selection = select_layers(
        model,
        calls,
        len(trace_inputs),
        depth=depth,
        conv_only=conv_only,
        kernel_range=kernel_range,
        include_parameter_free=include_parameter_free,
        remove_output_layer=remove_output_layer,
    )
    if not selection.layers:
        raise ValueError(f"no layer of {type(model).__name__} matches the selection: {selection.dropped}")
    return selection.layers


def compare_models(
    model_x: nn.Module,
    model_y: nn.Module,
    batches: Iterable,
    *,
    batches_y: Iterable | None = None,
    layers_x: Sequence[str] | None = None,
    layers_y: Sequence[str] | None = None,
    depth: int = -1,
    conv_only: bool = False,
    kernel_range: tuple[int, int] = (3, 100),
    include_parameter_free: bool = False,
    remove_output_layer: bool = False,
    kernel: str = "linear",
    estimator: str = "unbiased",
    sigma: float = 1.0,
    name_x: str | None = None,
    name_y: str | None = None,
    progress: bool = False,
) -> Comparison:
    """Compute minibatch CKA between every layer of ``model_x`` and every layer of ``model_y``.

    Each batch goes through both models; each selected layer's output becomes a kernel
    inside its forward hook, so nothing is stored between batches. The models run in
    eval mode under ``torch.inference_mode()`` on the device of their parameters. Their
    hooks are removed and their training flags restored afterwards, also when a forward
    pass raises.

    Args:
        model_x: the model whose layers are the rows.
        model_y: the model whose layers are the columns.
        batches: a DataLoader or any iterable of ``(n, ...)`` input tensors, or of
            tuples or lists whose first element is the input tensor (labels are
            ignored). Every batch needs at least 4 examples for the unbiased estimator.
        batches_y: inputs for ``model_y`` when it needs other preprocessing; the same
            examples in the same order and batches. Default: ``batches``.
        layers_x: module names to compare (``named_modules()`` paths, or ``name#k`` for
            the k-th call of a module that runs several times); default: ``depth``.
        layers_y: the same for ``model_y``.
        depth: -1 for leaf modules, or ``d >= 1`` for the modules at depth ``d`` plus
            shallower leaves, when no layer names are given.
        conv_only: compare only leaf convolutions with kernel sizes in ``kernel_range``.
        kernel_range: inclusive range of kernel sizes for ``conv_only``.
        include_parameter_free: also select modules without parameters.
        remove_output_layer: drop each model's last executed layer.
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"unbiased"`` (Song et al. 2012) or ``"biased"`` HSIC.
        sigma: RBF bandwidth as a multiple of the median distance.
        name_x: name of ``model_x`` for titles and files; default: its class name.
        name_y: name of ``model_y``; default: its class name.
        progress: show a progress bar over the batches.

    Returns:
        The matrix with both axes' layer names.

    Raises:
        ValueError: for unknown settings or layer names, or a batch too small for the
            estimator.
    """
    if kernel not in KERNELS:
        raise ValueError(f"expected kernel 'linear' or 'rbf', got {kernel!r}")
    if estimator not in MIN_EXAMPLES:
        raise ValueError(f"expected estimator 'unbiased' or 'biased', got {estimator!r}")

    device_x, device_y = _device_of(model_x), _device_of(model_y)
    pairs = zip(batches, batches_y, strict=True) if batches_y is not None else ((b, b) for b in batches)
    accumulator = MinibatchCKA()
    layers = None
    examples = 0

    def packed(recorder: KernelRecorder, inputs: torch.Tensor) -> torch.Tensor:
        return pack_grams(recorder.grams(inputs), kernel, estimator, sigma)

    with tqdm(desc="batches", unit="batch", disable=not progress) as bar:
        for batch_x, batch_y in pairs:
            inputs_x = _inputs_of(batch_x).to(device_x)
            inputs_y = _inputs_of(batch_y).to(device_y)
            if len(inputs_x) != len(inputs_y):
                raise ValueError(f"batch sizes differ: {len(inputs_x)} and {len(inputs_y)} examples")
            if len(inputs_x) < MIN_EXAMPLES[estimator]:
                raise ValueError(
                    f"the {estimator} HSIC estimator needs at least {MIN_EXAMPLES[estimator]} "
                    f"examples per batch, got {len(inputs_x)}"
                )

            if layers is None:
                selection = (depth, conv_only, kernel_range, include_parameter_free, remove_output_layer)
                layers = (
                    _choose_layers(model_x, inputs_x, layers_x, *selection),
                    _choose_layers(model_y, inputs_y, layers_y, *selection),
                )

            with full_float32_matmul():
                with KernelRecorder(model_x, layers[0], for_distances=kernel == "rbf") as recorder_x:
                    vectors_x = packed(recorder_x, inputs_x)
                with KernelRecorder(model_y, layers[1], for_distances=kernel == "rbf") as recorder_y:
                    vectors_y = packed(recorder_y, inputs_y)
            accumulator.update(vectors_x, vectors_y)
            examples += len(inputs_x)
            bar.update(1)

    if layers is None:
        raise ValueError("no batches were given")
    comparison = Comparison(
        matrix=accumulator.compute(),
        rows=[layer.name for layer in layers[0]],
        columns=[layer.name for layer in layers[1]],
        name_x=name_x or type(model_x).__name__,
        name_y=name_y or type(model_y).__name__,
        kernel=kernel,
        estimator=estimator,
        examples=examples,
    )
    log_undefined_layers(comparison.matrix, comparison.rows, comparison.columns, comparison.name_x, comparison.name_y)
    return comparison
