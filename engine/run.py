"""Running a plan: one forward pass per model over the batches, then CKA for every pair.

Each model runs once over the images, whatever the number of pairs and depths it is in.
During that pass the hooks of the union of its selected layers turn every output into
a Gram matrix, and each batch's kernels are packed (``cka.hsic_vectors``) and written
to a KernelStore. The pairs then read the packs back batch by batch, and each
(pair, batch) costs one matrix product.
"""

import dataclasses
import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from cka import MinibatchCKA, hsic_vectors, rbf_from_gram
import torchvision.transforms.functional as functional

from data import ImageSet, Normalizer, open_images, resized_batches
from models import (
    KernelRecorder,
    LayerInfo,
    LayerSelection,
    ModelLoadError,
    build_model,
    input_spec,
    kernel_sizes_present,
    select_layers,
    trace_calls,
    union_of_layers,
)

from .plan import KernelSettings, ModelSpec, PairTask, RunPlan, UsageError
from .store import KernelStore

__all__ = ["PairResult", "PreparedModel", "RunResult", "run_plan"]

logger = logging.getLogger(__name__)

# Images in the trial forward pass that orders the layers. With two, an output whose first
# dimension is not the batch can be detected.
_TRACE_IMAGES = 2


@dataclasses.dataclass
class PreparedModel:
    """A built model with its layers chosen for every depth its pairs request.

    Attributes:
        spec: what the model is.
        module: the model, in eval mode.
        normalizer: turns uint8 batches at ``spec.input_size`` into its input.
        layers: union of the selected layers, in execution order; the hooked layers.
        selections: ``{(depth, conv_only): selection}`` for each requested scope.
        rows: ``{(depth, conv_only): indices into layers}`` for each scope.
        settings: kernel settings its pairs need, in a fixed order.
    """

    spec: ModelSpec
    module: nn.Module
    normalizer: Normalizer
    layers: list[LayerInfo]
    selections: dict[tuple[int, bool], LayerSelection]
    rows: dict[tuple[int, bool], list[int]]
    settings: list[KernelSettings]


@dataclasses.dataclass
class PairResult:
    """The CKA matrix of one task with both axes' layer names.

    Attributes:
        task: the pair and its settings.
        matrix: ``(rows, columns)`` float64 CKA values; NaN where undefined.
        rows: layer names of ``task.model_x`` in execution order.
        columns: layer names of ``task.model_y`` in execution order.
        depth_x: depth used for the rows after clamping, -1 for leaves.
        depth_y: depth used for the columns after clamping.
    """

    task: PairTask
    matrix: torch.Tensor
    rows: list[str]
    columns: list[str]
    depth_x: int
    depth_y: int

    @property
    def nan_cells(self) -> int:
        """Number of undefined cells."""
        return int(torch.isnan(self.matrix).sum())


@dataclasses.dataclass
class RunResult:
    """Everything a run computed, for the output files and the run record."""

    plan: RunPlan
    images: ImageSet
    pairs: list[PairResult]
    models: list[PreparedModel]
    timings: dict[str, float]


def _scope(task: PairTask) -> tuple[int, bool]:
    return (task.depth, task.conv_only)


def _trace_inputs(images: ImageSet, size: int, normalizer: Normalizer) -> torch.Tensor:
    count = min(_TRACE_IMAGES, len(images))
    pixels = [functional.pil_to_tensor(images.resized(index, size)) for index in range(count)]
    return normalizer(torch.stack(pixels))


def _empty_selection_error(spec: ModelSpec, module: nn.Module, scope, plan: RunPlan, selection) -> UsageError:
    depth, conv_only = scope
    if conv_only:
        low, high = plan.kernel_range
        present = ", ".join("x".join(map(str, size)) for size in kernel_sizes_present(module)) or "none"
        return UsageError(
            f"--conv_only 1 selects no layer of {spec.name}: no convolution has every kernel "
            f"dimension in [{low}, {high}]. Its kernel sizes are: {present}. Change --kernel_size"
        )
    dropped = "; ".join(f"{name}: {reason}" for name, reason in list(selection.dropped.items())[:4])
    return UsageError(
        f"--layers_depth {depth} selects no usable layer of {spec.name} ({dropped or 'no module with parameters'}). "
        "Try another depth, --include_parameter_free 1 or --remove_output_layer 0"
    )


def prepare_model(spec: ModelSpec, tasks: list[PairTask], images: ImageSet, plan: RunPlan) -> PreparedModel:
    """Build one model, trace it on two images and choose its layers for every scope.

    Raises:
        ModelLoadError: when the weights cannot be obtained or the model rejects its input.
        UsageError: when a requested scope selects no layer.
    """
    options = plan.options
    module = build_model(spec.library, spec.name, spec.pretrained, spec.input_size, spec.seed, spec.weights)
    preprocessing = input_spec(spec.library, spec.name, spec.input_size)
    normalizer = Normalizer(
        preprocessing.mean, preprocessing.std, preprocessing.value_range, preprocessing.color_space
    )

    trace_inputs = _trace_inputs(images, spec.input_size, normalizer)
    try:
        calls = trace_calls(module, trace_inputs)
    except (RuntimeError, ValueError, AssertionError, IndexError) as error:
        raise ModelLoadError(
            f"{spec.name} rejected a {spec.input_size}x{spec.input_size} input: {error}. "
            "Choose another --input_shape (most models need 32 pixels or more, "
            "inception_v3 75, vision transformers a multiple of their patch size)"
        ) from error

    scopes = list(dict.fromkeys(_scope(task) for task in tasks))
    selections = {}
    for scope in scopes:
        depth, conv_only = scope
        selection = select_layers(
            module,
            calls,
            batch_size=len(trace_inputs),
            depth=depth,
            conv_only=conv_only,
            kernel_range=plan.kernel_range,
            include_parameter_free=bool(options.include_parameter_free),
            remove_output_layer=bool(options.remove_output_layer),
        )
        if not selection.layers:
            raise _empty_selection_error(spec, module, scope, plan, selection)
        selections[scope] = selection

    layers = union_of_layers(calls, selections.values())
    position = {(layer.module_name, layer.call): index for index, layer in enumerate(layers)}
    rows = {
        scope: [position[(layer.module_name, layer.call)] for layer in selection.layers]
        for scope, selection in selections.items()
    }
    settings = list(dict.fromkeys(task.kernel for task in tasks))
    return PreparedModel(spec, module, normalizer, layers, selections, rows, settings)


def _packed_kernels(grams: torch.Tensor, settings: KernelSettings) -> torch.Tensor:
    """Turn a batch's ``(layers, n, n)`` Gram matrices into packed centered kernels."""
    kernels = grams.to(torch.float64)
    if settings.kernel == "rbf":
        kernels = rbf_from_gram(kernels, settings.sigma)
    return hsic_vectors(kernels, settings.estimator)


def _pixel_batches(images: ImageSet, size: int, plan: RunPlan, store: KernelStore, keep: bool):
    """Yield the uint8 batches at ``size``, resizing once per size and run.

    With ``keep``, freshly resized batches are stored for the next model of that size.
    """
    options = plan.options
    if f"pixels{size}_batch0" in store:
        for batch_index in range(options.dataloader_size):
            yield store.get(f"pixels{size}_batch{batch_index}")
        return

    loader = resized_batches(images, size, options.batch_size, options.num_workers)
    for batch_index, pixels in enumerate(loader):
        if keep:
            store.put(f"pixels{size}_batch{batch_index}", pixels)
        yield pixels


def _kernels_key(model_key: int, settings_key: int, batch_index: int) -> str:
    return f"kernels_model{model_key}_settings{settings_key}_batch{batch_index}"


def compute_kernels(
    prepared: PreparedModel,
    model_key: int,
    images: ImageSet,
    plan: RunPlan,
    store: KernelStore,
    keep_pixels: bool = False,
    progress: bool = True,
) -> None:
    """Run one model over every batch and store the packed kernels of its layers."""
    device = torch.device(plan.device)
    module = prepared.module.to(device)
    bar = tqdm(
        total=plan.options.dataloader_size,
        desc=f"{prepared.spec.label} ({len(prepared.layers)} layers)",
        unit="batch",
        disable=not progress,
    )
    try:
        with KernelRecorder(module, prepared.layers) as recorder:
            pixel_batches = _pixel_batches(images, prepared.spec.input_size, plan, store, keep_pixels)
            for batch_index, pixels in enumerate(pixel_batches):
                inputs = prepared.normalizer(pixels.to(device, non_blocking=True))
                grams = recorder.grams(inputs)
                for settings_key, settings in enumerate(prepared.settings):
                    vectors = _packed_kernels(grams, settings)
                    store.put(_kernels_key(model_key, settings_key, batch_index), vectors)
                bar.update(1)
    finally:
        bar.close()
        prepared.module.to("cpu")


def compare_pairs(
    plan: RunPlan, prepared: dict[ModelSpec, PreparedModel], store: KernelStore
) -> list[PairResult]:
    """Accumulate minibatch CKA for every task from the stored kernels."""
    keys = {spec: index for index, spec in enumerate(prepared)}
    accumulators = [MinibatchCKA() for _ in plan.tasks]
    for batch_index in range(plan.options.dataloader_size):
        loaded: dict[str, torch.Tensor] = {}

        def vectors(spec: ModelSpec, settings: KernelSettings) -> torch.Tensor:
            key = _kernels_key(keys[spec], prepared[spec].settings.index(settings), batch_index)
            if key not in loaded:
                loaded[key] = store.get(key)
            return loaded[key]

        for task, accumulator in zip(plan.tasks, accumulators):
            rows_x = prepared[task.model_x].rows[_scope(task)]
            rows_y = prepared[task.model_y].rows[_scope(task)]
            accumulator.update(
                vectors(task.model_x, task.kernel)[rows_x],
                vectors(task.model_y, task.kernel)[rows_y],
            )

    results = []
    for task, accumulator in zip(plan.tasks, accumulators):
        selection_x = prepared[task.model_x].selections[_scope(task)]
        selection_y = prepared[task.model_y].selections[_scope(task)]
        results.append(
            PairResult(
                task=task,
                matrix=accumulator.compute(),
                rows=[layer.name for layer in selection_x.layers],
                columns=[layer.name for layer in selection_y.layers],
                depth_x=selection_x.depth,
                depth_y=selection_y.depth,
            )
        )
    return results


def run_plan(plan: RunPlan, progress: bool = True) -> RunResult:
    """Read the images, run every model once and compute every pair's CKA matrix.

    Raises:
        data.DatasetError, models.ModelLoadError, UsageError: for problems found before
            the forward passes start.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    options = plan.options
    # The Gram products stay in full float32 on GPUs: TF32 would cost CKA 3 digits.
    torch.backends.cuda.matmul.allow_tf32 = False

    images = open_images(
        options.dataset, plan.image_count, options.seed, options.data_root, bool(options.download)
    )
    logger.info("images: %s", images.description)

    prepared: dict[ModelSpec, PreparedModel] = {}
    for spec in plan.models:
        tasks = [task for task in plan.tasks if spec in (task.model_x, task.model_y)]
        prepared[spec] = prepare_model(spec, tasks, images, plan)
        logger.info("%s: %d layers hooked", spec.label, len(prepared[spec].layers))
    timings["prepare_s"] = time.perf_counter() - start

    with KernelStore() as store:
        models = list(prepared.values())
        for model_key, model in enumerate(models):
            model_start = time.perf_counter()
            later_sizes = {other.spec.input_size for other in models[model_key + 1 :]}
            keep_pixels = model.spec.input_size in later_sizes
            compute_kernels(model, model_key, images, plan, store, keep_pixels, progress)
            timings[f"forward_{model.spec.label}_s"] = time.perf_counter() - model_start
            model.module = None  # free the weights; only the layer lists are needed now

        pairs_start = time.perf_counter()
        pairs = compare_pairs(plan, prepared, store)
        timings["pairs_s"] = time.perf_counter() - pairs_start

    timings["total_s"] = time.perf_counter() - start
    return RunResult(plan, images, pairs, list(prepared.values()), timings)
