"""Running a plan: one forward pass per model over the batches, then CKA for every pair.

Each model runs once over the images, whatever the number of pairs and depths it is in.
During that pass the hooks of the union of its selected layers turn every output into
a Gram matrix, and each batch's Gram matrices are written to a KernelCache. The pairs
then read them back batch by batch: each (model, kernel setting, batch) is packed once
(``cka.pack_grams``) and each (pair, batch) costs one matrix product. Batches already in
a persistent cache are not computed again. Under ``torchrun`` each rank takes its share of the batches and one
all-reduce adds the ranks' sums.
"""

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time

import torch
import torchvision.transforms.functional as functional
from torch import nn
from tqdm.auto import tqdm

from cka import MinibatchCKA, pack_grams
from data import ImageSet, Normalizer, open_images, resized_batches
from models import (
    CallRecord,
    KernelRecorder,
    LayerInfo,
    LayerSelection,
    ModelLoadError,
    build_model,
    input_spec,
    kernel_sizes_present,
    TRACE_EXAMPLES,
    prefers_channels_last,
    select_layers,
    set_channels_last,
    trace_calls,
    union_of_layers,
    with_layout,
)

from .cache import CACHE_FORMAT, KernelCache, code_fingerprint, fingerprint, package_versions
from .distributed import DistributedContext, all_reduce_sum
from .plan import KernelSettings, ModelSpec, PairTask, RunPlan, UsageError
from .store import ScratchStore

__all__ = [
    "PairResult",
    "PreparedModel",
    "RunResult",
    "full_float32_matmul",
    "log_undefined_layers",
    "run_plan",
]

logger = logging.getLogger(__name__)

_INPUT_SIZE_HINT = (
    "Choose another --input_shape (most models need 32 pixels or more, alexnet 64, "
    "inception_v3 75, vision transformers a multiple of their patch size, maxvit_t 224)"
)

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
        key: cache key of its Gram matrices.
        channels_last: its parameters and inputs are laid out channels last.
        cached_batches: batches of this rank read from the cache instead of computed.
        build_seconds: time spent building the model and loading its weights.
    """

    spec: ModelSpec
    module: nn.Module
    normalizer: Normalizer
    layers: list[LayerInfo]
    selections: dict[tuple[int, bool], LayerSelection]
    rows: dict[tuple[int, bool], list[int]]
    settings: list[KernelSettings]
    key: str
    channels_last: bool = False
    cached_batches: list[int] = dataclasses.field(default_factory=list)
    build_seconds: float = 0.0

    @property
    def needs_distances(self) -> bool:
        """True when a pair uses RBF kernels, whose Gram matrices must give exact distances."""
        return any(settings.kernel == "rbf" for settings in self.settings)

    @property
    def layer_names(self) -> list[str]:
        """Names of the hooked layers, in execution order."""
        return [layer.name for layer in self.layers]


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
    def title(self) -> str:
        """The task's title, with the depths used when clamping changed them."""
        task = self.task
        if task.conv_only or task.depth == self.depth_x == self.depth_y:
            return task.title
        used = f"{self.depth_x}" if self.depth_x == self.depth_y else f"{self.depth_x} and {self.depth_y}"
        return f"{task.title} (depth used: {used})"

    @property
    def nan_cells(self) -> int:
        """Number of undefined cells."""
        return int(torch.isnan(self.matrix).sum())


@dataclasses.dataclass
class RunResult:
    """Everything a run computed, for the output files and the run record.

    Under ``torchrun`` every rank returns the same matrices; ``context`` identifies
    this rank.
    """

    plan: RunPlan
    images: ImageSet
    pairs: list[PairResult]
    models: list[PreparedModel]
    timings: dict[str, float]
    context: DistributedContext = dataclasses.field(default_factory=DistributedContext)


def _scope(task: PairTask) -> tuple[int, bool]:
    return (task.depth, task.conv_only)


def _trace_inputs(images: ImageSet, size: int, normalizer: Normalizer) -> torch.Tensor:
    count = min(TRACE_EXAMPLES, len(images))
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


def _weights_identity(spec: ModelSpec):
    if spec.weights is not None:
        status = os.stat(spec.weights)
        return {"file": spec.weights, "size": status.st_size, "mtime_ns": status.st_mtime_ns}
    return "pretrained" if spec.pretrained else f"random, seed {spec.seed}"


def _model_key(spec: ModelSpec, preprocessing, images: ImageSet, plan: RunPlan, device: str) -> str:
    """Return the cache key of a model's kernels: everything that changes their values."""
    return fingerprint(
        {
            "format": CACHE_FORMAT,
            "library": spec.library,
            "versions": package_versions(spec.library),
            "model": spec.name,
            "weights": _weights_identity(spec),
            "input_size": spec.input_size,
            "preprocessing": dataclasses.asdict(preprocessing),
            "images": images.source,
            "indices": images.indices,
            "batch_size": plan.options.batch_size,
            "device": torch.device(device).type,
            "code": code_fingerprint(),
        }
    )


# Exceptions a model raises when it cannot take its input.
_INPUT_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError)


def _trace(
    module: nn.Module, spec: ModelSpec, images: ImageSet, normalizer, key: str, cache: KernelCache, channels_last: bool
) -> tuple[list[CallRecord], bool]:
    """Return the model's call trace and layout, from the cache or from a forward pass on two images.

    With ``channels_last``, the model is laid out channels last and traced in that layout. A model
    that fails that way (such as one calling ``view`` on an activation) goes back to
    channels first, which is then its layout for the whole run.
    """
    cached = cache.get_json(key, "trace")
    if cached is not None:
        set_channels_last(module, cached["channels_last"])
        calls = [CallRecord(name, call, None if shape is None else tuple(shape)) for name, call, shape in cached["calls"]]
        return calls, cached["channels_last"]

    trace_inputs = _trace_inputs(images, spec.input_size, normalizer)
    calls = None
    if channels_last:
        try:
            calls = trace_calls(set_channels_last(module, True), with_layout(trace_inputs, True))
        except _INPUT_ERRORS as error:
            logger.info("%s failed to run channels last, so it runs channels first: %s", spec.label, error)
            set_channels_last(module, False)
            channels_last = False
    if calls is None:
        try:
            calls = trace_calls(module, trace_inputs)
        except _INPUT_ERRORS as error:
            raise ModelLoadError(
                f"{spec.name} rejected a {spec.input_size}x{spec.input_size} input: {str(error).rstrip('.!')}. "
                f"{_INPUT_SIZE_HINT}"
            ) from error
    records = [[record.module_name, record.call, record.output_shape] for record in calls]
    cache.put_json(key, "trace", {"calls": records, "channels_last": channels_last})
    return calls, channels_last


def prepare_model(
    spec: ModelSpec,
    tasks: list[PairTask],
    images: ImageSet,
    plan: RunPlan,
    cache: KernelCache,
    device: str = "cpu",
) -> PreparedModel:
    """Build one model, trace it on two images and choose its layers for every scope.

    Raises:
        ModelLoadError: when the weights cannot be obtained or the model rejects its input.
        UsageError: when a requested scope selects no layer.
    """
    options = plan.options
    build_start = time.perf_counter()
    try:
        module = build_model(spec.library, spec.name, spec.pretrained, spec.input_size, spec.seed, spec.weights)
    except ModelLoadError:
        raise
    except (AssertionError, ValueError, RuntimeError) as error:
        # Transformers check their input size when they are built.
        raise ModelLoadError(
            f"{spec.name} cannot be built for a {spec.input_size}x{spec.input_size} input: "
            f"{type(error).__name__}: {str(error).rstrip('.!')}. {_INPUT_SIZE_HINT}"
        ) from error
    build_seconds = time.perf_counter() - build_start
    preprocessing = input_spec(spec.library, spec.name, spec.input_size)
    preprocessing = dataclasses.replace(preprocessing, size=spec.input_size)
    normalizer = Normalizer(
        preprocessing.mean, preprocessing.std, preprocessing.value_range, preprocessing.color_space
    )
    key = _model_key(spec, preprocessing, images, plan, device)
    calls, channels_last = _trace(
        module, spec, images, normalizer, key, cache, prefers_channels_last(module, device)
    )

    scopes = list(dict.fromkeys(_scope(task) for task in tasks))
    selections = {}
    for scope in scopes:
        depth, conv_only = scope
        selection = select_layers(
            module,
            calls,
            batch_size=min(TRACE_EXAMPLES, len(images)),
            depth=depth,
            conv_only=conv_only,
            kernel_range=plan.kernel_range,
            include_parameter_free=bool(options.include_parameter_free),
            remove_output_layer=bool(options.remove_output_layer),
        )
        if not selection.layers:
            raise _empty_selection_error(spec, module, scope, plan, selection)
        selections[scope] = selection
    _log_selection(spec, selections)

    layers = union_of_layers(calls, selections.values())
    position = {(layer.module_name, layer.call): index for index, layer in enumerate(layers)}
    rows = {
        scope: [position[(layer.module_name, layer.call)] for layer in selection.layers]
        for scope, selection in selections.items()
    }
    settings = list(dict.fromkeys(task.kernel for task in tasks))
    prepared = PreparedModel(spec, module, normalizer, layers, selections, rows, settings, key, channels_last)
    prepared.build_seconds = build_seconds
    return prepared


def _log_selection(spec: ModelSpec, selections: dict) -> None:
    """Warn once per model about clamped depths and selected modules that give no layer."""
    dropped = {}
    for (depth, _), selection in selections.items():
        if depth not in (-1, selection.depth):
            logger.warning(
                "%s has no modules at depth %d; using its deepest level %d",
                spec.label, depth, selection.depth,
            )
        dropped.update(selection.dropped)
    if dropped:
        examples = ", ".join(list(dropped)[:3])
        logger.warning(
            "%s: %d selected module(s) left out because they never ran or return no usable "
            "tensor (%s%s); run_record.json lists each with its reason",
            spec.label, len(dropped), examples, ", ..." if len(dropped) > 3 else "",
        )


def _prefetched(items):
    """Iterate ``items`` while a thread prepares the next one.

    Resizing releases the GIL, so the next batch's images are prepared while the model
    runs on the current one. Exceptions of the thread are raised where its item is used.
    """
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    iterator = iter(items)
    try:
        pending = executor.submit(next, iterator, None)
        while True:
            item = pending.result()
            if item is None:
                return
            pending = executor.submit(next, iterator, None)
            yield item
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _idle_processor_for(device: str) -> bool:
    """Tell whether a thread can prepare images without slowing down the model.

    A GPU leaves the processor free. On the CPU, torch runs its operators on as many
    threads as there are cores, so a busy extra thread stalls them all. On a 2-core
    machine, the prefetching thread made the forward passes of ``bench/run_ours.py``
    on resnet18 and resnet34 10 to 20 % slower.

    NOTE: with hyperthreading, torch's default is one thread per physical core, so the
    images are prefetched on a sibling thread. Whether that helps was not measured.
    """
    if torch.device(device).type != "cpu":
        return True
    try:
        processors = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        processors = os.cpu_count() or 1
    return processors > torch.get_num_threads()


def _pixel_batches(
    images: ImageSet,
    size: int,
    batches: list[int],
    plan: RunPlan,
    scratch: ScratchStore,
    keep: bool,
    prefetch: bool,
):
    """Yield ``(batch index, uint8 pixels)`` at ``size``, resizing each batch once per run.

    With ``keep``, freshly resized batches are stored for the next model of that size.
    With ``prefetch``, a thread resizes the next batch while the current one is used.
    """
    options = plan.options
    keys = {batch: f"pixels{size}_batch{batch}" for batch in batches}
    missing = [batch for batch in batches if keys[batch] not in scratch]
    loader = resized_batches(images, size, options.batch_size, options.num_workers, missing)
    loader = _prefetched(loader) if prefetch and options.num_workers == 0 else iter(loader)
    for batch in batches:
        if batch in missing:
            pixels = next(loader)
            if keep:
                scratch.put(keys[batch], pixels)
        else:
            pixels = scratch.get(keys[batch])
        yield batch, pixels


def _batches_to_compute(prepared: PreparedModel, batches: list[int], cache: KernelCache) -> list[int]:
    needed = set(prepared.layer_names)
    return [
        batch
        for batch in batches
        if not needed <= cache.stored_layers(prepared.key, batch, prepared.needs_distances)
    ]


def compute_kernels(
    prepared: PreparedModel,
    batches: list[int],
    images: ImageSet,
    plan: RunPlan,
    cache: KernelCache,
    scratch: ScratchStore,
    device: str = "cpu",
    keep_pixels: bool = False,
    progress: bool = True,
) -> None:
    """Run one model over ``batches`` and store the Gram matrices of its layers."""
    module = prepared.module.to(device)
    bar = tqdm(
        total=len(batches),
        desc=f"{prepared.spec.label} ({len(prepared.layers)} layers)",
        unit="batch",
        disable=not progress,
    )
    try:
        distances = prepared.needs_distances
        with KernelRecorder(module, prepared.layers, for_distances=distances) as recorder:
            pixel_batches = _pixel_batches(
                images, prepared.spec.input_size, batches, plan, scratch, keep_pixels, _idle_processor_for(device)
            )
            for batch, pixels in pixel_batches:
                inputs = prepared.normalizer(pixels.to(device, non_blocking=True))
                inputs = with_layout(inputs, prepared.channels_last)
                cache.put_grams(prepared.key, batch, prepared.layer_names, recorder.grams(inputs), distances)
                bar.update(1)
    finally:
        bar.close()


def compare_pairs(
    plan: RunPlan, prepared: dict[ModelSpec, PreparedModel], cache: KernelCache, batches: list[int]
) -> list[MinibatchCKA]:
    """Accumulate every task's HSIC sums over ``batches`` from the stored Gram matrices."""
    accumulators = []
    for task in plan.tasks:
        rows = len(prepared[task.model_x].rows[_scope(task)])
        columns = len(prepared[task.model_y].rows[_scope(task)])
        accumulators.append(MinibatchCKA(rows, columns))

    for batch in batches:
        grams: dict[ModelSpec, torch.Tensor] = {}
        packed: dict[tuple[ModelSpec, KernelSettings], torch.Tensor] = {}

        def vectors(spec: ModelSpec, settings: KernelSettings) -> torch.Tensor:
            if spec not in grams:
                grams[spec] = cache.get_grams(prepared[spec].key, batch, prepared[spec].layer_names)
            if (spec, settings) not in packed:
                packed[spec, settings] = pack_grams(
                    grams[spec], settings.kernel, settings.estimator, settings.sigma
                )
            return packed[spec, settings]

        for task, accumulator in zip(plan.tasks, accumulators):
            rows_x = prepared[task.model_x].rows[_scope(task)]
            rows_y = prepared[task.model_y].rows[_scope(task)]
            accumulator.update(
                vectors(task.model_x, task.kernel)[rows_x],
                vectors(task.model_y, task.kernel)[rows_y],
            )
    return accumulators


def log_undefined_layers(matrix: torch.Tensor, rows: list[str], columns: list[str], name_x: str, name_y: str) -> None:
    """Warn about layers whose every CKA value is NaN, naming them."""
    undefined = torch.isnan(matrix)
    if not undefined.any():
        return
    row_names = [name for name, empty in zip(rows, undefined.all(dim=1).tolist()) if empty]
    column_names = [name for name, empty in zip(columns, undefined.all(dim=0).tolist()) if empty]
    for model, names in ((name_x, row_names), (name_y, column_names)):
        if names:
            logger.warning(
                "%s: %d layer(s) have undefined CKA (NaN, grey in the heatmap) because their "
                "kernel is the same for every image (a constant layer) or not finite: %s",
                model, len(names), ", ".join(names[:8]) + (", ..." if len(names) > 8 else ""),
            )


def _sum_over_ranks(accumulators: list[MinibatchCKA], context: DistributedContext) -> None:
    """Replace every accumulator's sums by their total over all ranks, in one all-reduce."""
    if context.world_size <= 1:
        return
    counts = torch.tensor([float(acc.batches) for acc in accumulators], dtype=torch.float64)
    parts = [tensor for acc in accumulators for tensor in (acc.cross.flatten(), acc.self_x, acc.self_y)]
    total = all_reduce_sum(torch.cat([*parts, counts]), context)
    offset = 0
    for accumulator in accumulators:
        for name in ("cross", "self_x", "self_y"):
            tensor = getattr(accumulator, name)
            size = tensor.numel()
            setattr(accumulator, name, total[offset : offset + size].view_as(tensor).clone())
            offset += size
    for accumulator, count in zip(accumulators, total[offset:].tolist()):
        accumulator.batches = int(count)


@contextlib.contextmanager
def full_float32_matmul():
    """Keep float32 matrix products in full precision on GPUs while the block runs.

    TF32 would cost the Gram products 3 decimal digits. Convolutions keep cuDNN's own
    setting, as in the models' ordinary inference. The previous setting is restored.
    """
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def run_plan(
    plan: RunPlan,
    progress: bool = True,
    context: DistributedContext | None = None,
    cache_dir: str | None = None,
) -> RunResult:
    """Read the images, run every model once and compute every pair's CKA matrix.

    Args:
        plan: the checked plan.
        progress: show a progress bar per model pass.
        context: this process's place under ``torchrun``; default: a single process.
        cache_dir: folder of the persistent kernel cache; None computes everything and
            keeps the kernels in a temporary folder.

    Raises:
        data.DatasetError, models.ModelLoadError, UsageError: for problems found before
            the forward passes start.
    """
    context = context or DistributedContext()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    options = plan.options
    device = context.device(plan.device)
    my_batches = context.batches(options.dataloader_size)

    images = open_images(
        options.dataset, plan.image_count, options.seed, options.data_root, bool(options.download)
    )
    logger.info("images: %s", images.description)

    with KernelCache(cache_dir) as cache, ScratchStore() as scratch, full_float32_matmul():
        prepared: dict[ModelSpec, PreparedModel] = {}
        for spec in plan.models:
            tasks = [task for task in plan.tasks if spec in (task.model_x, task.model_y)]
            prepared[spec] = prepare_model(spec, tasks, images, plan, cache, device)
            logger.info("%s: %d layers hooked", spec.label, len(prepared[spec].layers))
        timings["prepare_s"] = time.perf_counter() - start
        timings["build_s"] = sum(model.build_seconds for model in prepared.values())

        models = list(prepared.values())
        for index, model in enumerate(models):
            model_start = time.perf_counter()
            to_compute = _batches_to_compute(model, my_batches, cache)
            model.cached_batches = [batch for batch in my_batches if batch not in to_compute]
            if model.cached_batches:
                logger.info("%s: %d of %d batches read from the cache", model.spec.label,
                            len(model.cached_batches), len(my_batches))
            if to_compute:
                later_sizes = {other.spec.input_size for other in models[index + 1 :]}
                compute_kernels(
                    model, to_compute, images, plan, cache, scratch, device,
                    keep_pixels=model.spec.input_size in later_sizes,
                    progress=progress and context.is_main,
                )
            timings[f"forward_{model.spec.label}_s"] = time.perf_counter() - model_start
            model.module = None  # free the weights; only the layer lists are needed now

        pairs_start = time.perf_counter()
        accumulators = compare_pairs(plan, prepared, cache, my_batches)
        _sum_over_ranks(accumulators, context)
        timings["pairs_s"] = time.perf_counter() - pairs_start

    pairs = []
    for task, accumulator in zip(plan.tasks, accumulators):
        selection_x = prepared[task.model_x].selections[_scope(task)]
        selection_y = prepared[task.model_y].selections[_scope(task)]
        pairs.append(
            PairResult(
                task=task,
                matrix=accumulator.compute(),
                rows=[layer.name for layer in selection_x.layers],
                columns=[layer.name for layer in selection_y.layers],
                depth_x=selection_x.depth,
                depth_y=selection_y.depth,
            )
        )
    if context.is_main:
        for pair in pairs:
            log_undefined_layers(pair.matrix, pair.rows, pair.columns, pair.task.model_x.label, pair.task.model_y.label)
    timings["total_s"] = time.perf_counter() - start
    return RunResult(plan, images, pairs, models, timings, context)
