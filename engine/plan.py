"""Turning the command-line options into a checked plan of model pairs.

Every usage mistake is found here, before any model is built or image read, and raised
as a UsageError whose message names the flag, the value and the fix.
"""

import dataclasses
import itertools
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence

from cka import MIN_EXAMPLES
from models import LIBRARIES, check_model_name, input_spec

__all__ = [
    "CKA_TYPES",
    "KernelSettings",
    "ModelSpec",
    "PairTask",
    "RunOptions",
    "RunPlan",
    "UsageError",
    "build_plan",
]

logger = logging.getLogger(__name__)

CKA_TYPES = {"kernel_CKA": "rbf", "linear_CKA": "linear"}


class UsageError(ValueError):
    """Invalid options or combination of options, with a message on how to fix them."""


@dataclasses.dataclass
class RunOptions:
    """Every option of a run, with the command line's defaults.

    List-valued options hold one value for every pair or one value per pair.
    """

    models_names: list[str]
    compare_models_names: list[str] | None = None
    dataset: str = "CIFAR10"
    batch_size: int = 5
    dataloader_size: int = 2
    torchvision: int = 0
    library: str | None = None
    weights: list[str] | None = None
    compare_weights: list[str] | None = None
    pretrained: list[int] = dataclasses.field(default_factory=lambda: [1])
    compare_pretrained: list[int] | None = None
    device: int = 0
    output_path: str = "./output"
    input_shape: list[int] = dataclasses.field(default_factory=lambda: [224])
    CKA_type: list[str] = dataclasses.field(default_factory=lambda: ["kernel_CKA"])
    layers_depth: list[int] = dataclasses.field(default_factory=lambda: [-1])
    conv_only: int = 0
    remove_output_layer: int = 1
    compare_all: int = 0
    kernel_size: list[int] = dataclasses.field(default_factory=lambda: [3, 100])
    include_parameter_free: int = 0
    hsic: str = "unbiased"
    rbf_sigma: float = 1.0
    seed: int = 0
    data_root: str | None = None
    download: int = 1
    num_workers: int = 0
    cache: int = 1
    cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that determines one model instance of a run.

    Attributes:
        library: ``"torchvision"``, ``"pretrainedmodels"`` or ``"timm"``.
        name: architecture name in that library.
        pretrained: ImageNet weights, or random initialisation seeded by ``seed``;
            ignored when ``weights`` is set.
        input_size: side of the square input in pixels.
        seed: seed of the random initialisation.
        weights: checkpoint file loaded instead of the library's weights, or None.
        label: short name that distinguishes this instance from the others of the run.
    """

    library: str
    name: str
    pretrained: bool
    input_size: int
    seed: int
    weights: str | None = None
    label: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """How a layer's batch becomes a packed centered kernel.

    Attributes:
        kernel: ``"linear"`` or ``"rbf"``.
        sigma: RBF bandwidth factor relative to the median distance; unused for linear.
        estimator: ``"unbiased"`` or ``"biased"`` HSIC.
    """

    kernel: str
    sigma: float
    estimator: str


@dataclasses.dataclass(frozen=True)
class PairTask:
    """One heatmap: the layers of ``model_x`` (rows) against those of ``model_y`` (columns).

    Attributes:
        model_x: the ``--models_names`` side.
        model_y: the ``--compare_models_names`` side.
        depth: requested layer depth, -1 for leaves; ignored when ``conv_only``.
        conv_only: compare convolutions in the kernel-size range instead of a depth.
        cka_type: ``"kernel_CKA"`` or ``"linear_CKA"``.
        kernel: the kernel settings behind ``cka_type``.
        stem: output file name without extension, unique within the run.
    """

    model_x: ModelSpec
    model_y: ModelSpec
    depth: int
    conv_only: bool
    cka_type: str
    kernel: KernelSettings
    stem: str = ""

    @property
    def title(self) -> str:
        scope = "conv_only" if self.conv_only else f"depth {self.depth}"
        return f"{scope} {self.model_y.label} vs {self.model_x.label}"


@dataclasses.dataclass
class RunPlan:
    """A checked run: the pairs to compare and the settings they share."""

    options: RunOptions
    tasks: list[PairTask]
    library: str
    image_count: int
    kernel_range: tuple[int, int]
    device: str

    @property
    def models(self) -> list[ModelSpec]:
        """Distinct model instances in order of first appearance."""
        ordered = {}
        for task in self.tasks:
            ordered.setdefault(task.model_x, task.model_x)
            ordered.setdefault(task.model_y, task.model_y)
        return list(ordered)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _expand(flag: str, values: Sequence, pairs: int) -> list:
    """Broadcast a per-pair list flag: one value for all pairs, or one per pair."""
    if len(values) == 1:
        return list(values) * pairs
    if len(values) == pairs:
        return list(values)
    hint = " To run every pair at several depths, add --compare_all 1." if flag == "layers_depth" else ""
    fix = "give 1 value" if pairs == 1 else f"give 1 value for every pair or {pairs} values, one per pair"
    raise UsageError(
        f"--{flag} got {_count(len(values), 'value')} but the run has {_count(pairs, 'pair')}; {fix}.{hint}"
    )


def _check_binary(flag: str, value: int) -> None:
    if value not in (0, 1):
        raise UsageError(f"--{flag} must be 0 or 1, got {value}")


def _check_options(options: RunOptions) -> None:
    for flag in ("torchvision", "conv_only", "remove_output_layer", "compare_all",
                 "include_parameter_free", "download", "cache"):
        _check_binary(flag, getattr(options, flag))
    for flag in ("pretrained", "compare_pretrained"):
        for value in getattr(options, flag) or []:
            _check_binary(flag, value)

    if options.batch_size < 1 or options.dataloader_size < 1:
        raise UsageError(
            f"--batch_size and --dataloader_size must be at least 1, got "
            f"{options.batch_size} and {options.dataloader_size}"
        )
    if options.hsic not in MIN_EXAMPLES:
        raise UsageError(f"--hsic must be 'unbiased' or 'biased', got {options.hsic!r}")
    needed = MIN_EXAMPLES[options.hsic]
    if options.batch_size < needed:
        hint = " or use --hsic biased (2 or more)" if options.hsic == "unbiased" else ""
        raise UsageError(
            f"--batch_size {options.batch_size} is too small: the {options.hsic} HSIC "
            f"estimator needs at least {needed} images per batch; raise --batch_size{hint}"
        )
    for depth in options.layers_depth:
        if depth == 0 or depth < -1:
            raise UsageError(
                f"--layers_depth {depth} is invalid: use -1 for the deepest layers or a "
                "depth of 1 or more"
            )
    for size in options.input_shape:
        if size < 1:
            raise UsageError(f"--input_shape must be a positive number of pixels, got {size}")
    for cka_type in options.CKA_type:
        if cka_type not in CKA_TYPES:
            raise UsageError(f"--CKA_type must be kernel_CKA or linear_CKA, got {cka_type!r}")
    if not (options.rbf_sigma > 0 and math.isfinite(options.rbf_sigma)):
        raise UsageError(f"--rbf_sigma must be a positive finite number, got {options.rbf_sigma}")
    if not 0 <= options.seed < 2**63:
        raise UsageError(f"--seed must be between 0 and 2**63 - 1, got {options.seed}")
    if "kernel_CKA" in options.CKA_type and options.batch_size < 3:
        raise UsageError(
            f"--batch_size {options.batch_size} is too small for kernel_CKA: with 2 images the "
            "median-distance bandwidth makes every layer's kernel the same; use 3 or more"
        )
    if options.hsic == "unbiased" and options.batch_size < 10:
        logger.warning(
            "batches of %d images give noisy unbiased HSIC estimates and CKA values can fall "
            "well below 0; 32 or more images per batch are better",
            options.batch_size,
        )
    for size in options.input_shape:
        if 0 < size < 16:
            logger.warning("--input_shape %d is tiny: most layers see almost no image", size)
    if options.num_workers < 0:
        raise UsageError(f"--num_workers must be 0 or more, got {options.num_workers}")


def _kernel_range(options: RunOptions) -> tuple[int, int]:
    sizes = list(options.kernel_size)
    if len(sizes) not in (1, 2):
        raise UsageError(
            f"--kernel_size takes 1 value (an exact size) or 2 (an inclusive range), got {len(sizes)}"
        )
    low, high = sizes[0], sizes[-1]
    if low < 1:
        raise UsageError(f"--kernel_size values must be at least 1, got {low}")
    if low > high:
        raise UsageError(
            f"--kernel_size {low} {high} is an empty range: give the smaller size first, "
            f"as in --kernel_size {high} {low}"
        )
    return low, high


def _resolve_device(device: int) -> str:
    import torch

    if device == -1:
        return "cpu"
    if device < -1:
        raise UsageError(f"--device must be -1 (CPU) or a CUDA device index, got {device}")
    if not torch.cuda.is_available():
        logger.warning("CUDA is not available; running on the CPU instead of cuda:%d", device)
        return "cpu"
    count = torch.cuda.device_count()
    if device >= count:
        raise UsageError(
            f"--device {device} does not exist: this machine has {count} CUDA device(s), "
            f"numbered 0 to {count - 1}; use -1 for the CPU"
        )
    return f"cuda:{device}"


def _check_writable_folder(flag: str, path: str) -> None:
    """Raise UsageError unless ``path`` is a writable folder or can be created as one.

    Nothing is created: a test file is written and removed in ``path`` or in its
    nearest existing parent, because ``os.access`` returns True for root even where writes
    fail (``/proc``, read-only mounts).
    """
    if not path:
        raise UsageError(f"--{flag} is empty; give a folder such as ./output")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--{flag} {path} is a file, not a folder; choose another path")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(existing)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(
            f"--{flag} {path} cannot be written ({type(error).__name__} in {existing}); "
            "choose a folder you can write to"
        ) from error


def _expand_user_paths(options: RunOptions) -> RunOptions:
    """Expand ``~`` in every path option, which a quoted shell argument leaves as is."""
    def expand(path):
        return None if path is None else os.path.expanduser(path)

    return dataclasses.replace(
        options,
        output_path=expand(options.output_path),
        dataset=expand(options.dataset),
        data_root=expand(options.data_root),
        cache_dir=expand(options.cache_dir),
        weights=None if options.weights is None else [expand(path) for path in options.weights],
        compare_weights=None if options.compare_weights is None else [expand(path) for path in options.compare_weights],
    )


def _library(options: RunOptions) -> str:
    """Return the model library: ``--library`` when given, else the ``--torchvision`` flag's."""
    if options.library is None:
        return "torchvision" if options.torchvision else "pretrainedmodels"
    if options.library not in LIBRARIES:
        raise UsageError(f"--library must be one of {', '.join(LIBRARIES)}, got {options.library!r}")
    if options.torchvision and options.library != "torchvision":
        raise UsageError(
            f"--torchvision 1 conflicts with --library {options.library}; drop --torchvision"
        )
    return options.library


def _weights_per_model(flag: str, paths: Sequence[str] | None, count: int) -> list[str | None]:
    """Expand ``--weights``-like paths to one per model; ``none`` keeps the library's weights."""
    if paths is None:
        return [None] * count
    if len(paths) == 1:
        paths = list(paths) * count
    elif len(paths) != count:
        raise UsageError(
            f"--{flag} got {len(paths)} paths for {count} models; give 1 path for every "
            f"model or {count} paths, one per model (none keeps the library's weights)"
        )
    expanded = []
    for path in paths:
        if path.lower() == "none":
            expanded.append(None)
        elif not os.path.isfile(path):
            raise UsageError(f"--{flag}: checkpoint file {path} not found")
        else:
            expanded.append(os.path.abspath(path))
    return expanded


@dataclasses.dataclass(frozen=True)
class _Side:
    name: str
    weights: str | None


def _pairs(options: RunOptions) -> list[tuple[_Side, _Side]]:
    """Return the (rows model, columns model) of every pair, before depths."""
    names = list(options.models_names)
    weights = _weights_per_model("weights", options.weights, len(names))
    sides = [_Side(name, path) for name, path in zip(names, weights)]
    if options.compare_all:
        if options.compare_models_names:
            logger.warning("--compare_models_names is ignored with --compare_all 1")
        if options.compare_weights:
            logger.warning("--compare_weights is ignored with --compare_all 1; use --weights")
        combinations = itertools.combinations_with_replacement(range(len(names)), 2)
        return [(sides[i], sides[j]) for i, j in combinations]

    compare = options.compare_models_names
    if compare is not None and len(compare) != len(names):
        raise UsageError(
            f"--compare_models_names got {_count(len(compare), 'name')} for {len(names)} "
            "--models_names; give one per model, or omit it to compare each model with itself"
        )
    if compare is None and options.compare_weights is None:
        return [(side, side) for side in sides]
    compare = compare or names
    compare_weights = _weights_per_model("compare_weights", options.compare_weights, len(compare))
    return [(side, _Side(name, path)) for side, name, path in zip(sides, compare, compare_weights)]


def _label_models(specs: list[ModelSpec]) -> dict[ModelSpec, ModelSpec]:
    """Give each distinct spec a label that distinguishes it from every other spec of the run.

    The label is the model name, with the weights file's stem when weights are given,
    plus what differs between specs that would otherwise share it: pretrained or random,
    input size, library, the weights' parent folder, and at last a counter.
    """
    def base(spec: ModelSpec) -> str:
        if spec.weights is None:
            return spec.name
        stem = os.path.splitext(os.path.basename(spec.weights))[0]
        return stem if spec.name in stem else f"{spec.name}-{stem}"

    labels = {}
    for spec in specs:
        same_base = [other for other in specs if base(other) == base(spec)]
        parts = [base(spec)]
        if len({other.pretrained for other in same_base}) > 1 and spec.weights is None:
            parts.append("pretrained" if spec.pretrained else "random")
        if len({other.input_size for other in same_base}) > 1:
            parts.append(f"{spec.input_size}px")
        if len({other.library for other in same_base}) > 1:
            parts.append(spec.library)
        labels[spec] = "-".join(parts)

    shared = [spec for spec in specs if list(labels.values()).count(labels[spec]) > 1]
    for spec in shared:
        if spec.weights is not None and os.path.basename(os.path.dirname(spec.weights)):
            labels[spec] += "-" + os.path.basename(os.path.dirname(spec.weights))
    shared = [spec for spec in specs if list(labels.values()).count(labels[spec]) > 1]
    seen: dict[str, int] = {}
    for spec in shared:
        seen[labels[spec]] = seen.get(labels[spec], 0) + 1
        labels[spec] += f"-{seen[labels[spec]]}"
    return {spec: dataclasses.replace(spec, label=label) for spec, label in labels.items()}


def _file_stem(task: PairTask) -> str:
    scope = "conv_only" if task.conv_only else f"depth_{task.depth}"
    stem = f"{scope}_{task.model_y.label}_vs_{task.model_x.label}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


def _without_repeats(tasks: list[PairTask]) -> list[PairTask]:
    """Drop tasks that repeat an earlier one exactly: they would give the same matrix."""
    unique = list(dict.fromkeys(tasks))
    if len(unique) < len(tasks):
        logger.warning("%d repeated pair(s) are computed once", len(tasks) - len(unique))
    return unique


def _unique_stems(tasks: list[PairTask]) -> list[PairTask]:
    """Give every task a distinct file stem, adding the CKA type where only it differs."""
    plain = [_file_stem(task) for task in tasks]
    stems = []
    for stem, task in zip(plain, tasks):
        types = {other.cka_type for other, other_stem in zip(tasks, plain) if other_stem == stem}
        stems.append(f"{stem}_{task.cka_type}" if len(types) > 1 else stem)
    seen: dict[str, int] = {}
    unique = []
    for task, stem in zip(tasks, stems):
        seen[stem] = seen.get(stem, 0) + 1
        if seen[stem] > 1:
            stem = f"{stem}_{seen[stem]}"
        unique.append(dataclasses.replace(task, stem=stem))
    return unique


def build_plan(options: RunOptions) -> RunPlan:
    """Check the options and expand them into one task per heatmap.

    Raises:
        UsageError: for any invalid option or combination.
        models.ModelLoadError: for an unknown model name.
    """
    if not options.models_names:
        raise UsageError("--models_names needs at least one model name")
    _check_options(options)
    options = _expand_user_paths(options)
    kernel_range = _kernel_range(options) if options.conv_only else (3, 100)
    _check_writable_folder("output_path", options.output_path)
    if options.cache and options.cache_dir is not None:
        _check_writable_folder("cache_dir", options.cache_dir)
    library = _library(options)

    pairs = _pairs(options)
    for side_x, side_y in pairs:
        check_model_name(library, side_x.name)
        check_model_name(library, side_y.name)

    count = len(pairs)
    pretrained = _expand("pretrained", options.pretrained, count)
    compare_pretrained = (
        _expand("compare_pretrained", options.compare_pretrained, count)
        if options.compare_pretrained is not None
        else pretrained
    )
    sizes = _expand("input_shape", options.input_shape, count)
    cka_types = _expand("CKA_type", options.CKA_type, count)
    if options.compare_all:
        depths_per_pair = [list(dict.fromkeys(options.layers_depth))] * count
    else:
        depths_per_pair = [[depth] for depth in _expand("layers_depth", options.layers_depth, count)]

    if options.conv_only:
        if any(depth != -1 for depth in options.layers_depth):
            logger.warning("--layers_depth is ignored with --conv_only 1: convolutions are leaf modules")
        depths_per_pair = [[-1]] * count
    if library == "pretrainedmodels" and any(size != 224 for size in options.input_shape):
        logger.warning("--input_shape is ignored for pretrainedmodels models, which use their own input size")

    def spec(side: _Side, is_pretrained: int, size: int) -> ModelSpec:
        if library == "pretrainedmodels":
            size = input_spec(library, side.name, size).size
        pretrained_flag = bool(is_pretrained) and side.weights is None
        return ModelSpec(library, side.name, pretrained_flag, size, options.seed, side.weights)

    tasks = []
    for index, (side_x, side_y) in enumerate(pairs):
        settings = KernelSettings(CKA_TYPES[cka_types[index]], options.rbf_sigma, options.hsic)
        model_x = spec(side_x, pretrained[index], sizes[index])
        model_y = spec(side_y, compare_pretrained[index], sizes[index])
        for depth in depths_per_pair[index]:
            tasks.append(
                PairTask(model_x, model_y, depth, bool(options.conv_only), cka_types[index], settings)
            )

    labels = _label_models(list(dict.fromkeys([t.model_x for t in tasks] + [t.model_y for t in tasks])))
    tasks = [
        dataclasses.replace(task, model_x=labels[task.model_x], model_y=labels[task.model_y])
        for task in tasks
    ]
    return RunPlan(
        options=options,
        tasks=_unique_stems(_without_repeats(tasks)),
        library=library,
        image_count=options.batch_size * options.dataloader_size,
        kernel_range=kernel_range,
        device=_resolve_device(options.device),
    )
