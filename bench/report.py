"""Results of ``bench/benchmark.py`` and the Markdown page that presents them."""

import dataclasses
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from workloads import MEMORY_CHECK_BASE, Workload

OURS = "ours"
OURS_API = "ours, Python API"
FLOOR = "floor"
FLOOR_AS_OURS = "floor, as ours runs"
REFERENCE = "numpy float64 reference"
# Differences above this are called out under each agreement table.
AGREEMENT_THRESHOLD = 1e-4

# A comparison is (rows model, columns model, depth).
Comparison = tuple[str, str, int]


@dataclasses.dataclass
class Measurement:
    """One counted run of a tool.

    Attributes:
        seconds: wall time of the timed part.
        peak_rss_kib: peak RSS of the process (``ru_maxrss``).
        rss_increase_kib: peak RSS minus the RSS right before the timed part. For a peer
            on a workload with several comparisons, the largest over its processes.
        total_seconds: ours only: the engine's whole ``total_s``, model building included.
        torch_threads: ``torch.get_num_threads()`` in the process.
        images_max_difference: ours only: the largest difference between the engine's model
            inputs and the image array that the other tools read.
        model_bytes: floor only: size of the models' parameters and buffers.
    """

    seconds: float
    peak_rss_kib: int
    rss_increase_kib: int
    total_seconds: float | None = None
    torch_threads: int | None = None
    images_max_difference: float | None = None
    model_bytes: int | None = None


@dataclasses.dataclass
class ToolRuns:
    """Everything one tool produced on one workload.

    Attributes:
        tool: ``"ours"``, ``"floor"``, ``"floor, as ours runs"``, ``"ours, Python API"``
            or a peer name.
        measurements: the counted runs.
        matrices: CKA matrix of each comparison, from the last counted run.
        estimator: what a peer computes, as ``bench/peers.py`` describes it.
        status: None when the tool ran; otherwise why it has no numbers.
    """

    tool: str
    measurements: list[Measurement] = dataclasses.field(default_factory=list)
    matrices: dict[Comparison, np.ndarray] = dataclasses.field(default_factory=dict)
    estimator: str | None = None
    status: str | None = None

    def median(self, field: str) -> float:
        return statistics.median(getattr(measurement, field) for measurement in self.measurements)


@dataclasses.dataclass
class WorkloadResult:
    """The measurements and matrices of one workload.

    Attributes:
        workload: the workload.
        tools: the runs of every tool, in the order they ran.
        layers: the row and column layer names of each comparison, from our engine.
        overwritten: for each (model, depth), the layers whose output an in-place op
            changes after the forward hook fires.
        references: the float64 numpy reference matrix of each comparison.
        reference_status: None unless the reference failed.
    """

    workload: Workload
    tools: dict[str, ToolRuns]
    layers: dict[Comparison, tuple[list[str], list[str]]] = dataclasses.field(default_factory=dict)
    overwritten: dict[tuple[str, int], list[str]] = dataclasses.field(default_factory=dict)
    references: dict[Comparison, np.ndarray] = dataclasses.field(default_factory=dict)
    reference_status: str | None = None


@dataclasses.dataclass
class Agreement:
    """Largest absolute differences between our matrices and another tool's.

    Cells are split by whether their row or column layer is overwritten in place after
    its hook fires. Only cells finite in both matrices count.
    """

    clean_cells: int = 0
    clean_max: float = math.nan
    clean_worst: str = ""
    clean_above: int = 0
    overwritten_cells: int = 0
    overwritten_max: float = math.nan
    nan_mismatches: int = 0
    ours_negative: int = 0

    @property
    def all_max(self) -> float:
        values = [value for value in (self.clean_max, self.overwritten_max) if not math.isnan(value)]
        return max(values) if values else math.nan

    def add(self, other: "Agreement") -> "Agreement":
        worse = other if math.isnan(self.clean_max) or other.clean_max > self.clean_max else self
        return Agreement(
            clean_cells=self.clean_cells + other.clean_cells,
            clean_max=_nan_max(self.clean_max, other.clean_max),
            clean_worst=worse.clean_worst,
            clean_above=self.clean_above + other.clean_above,
            overwritten_cells=self.overwritten_cells + other.overwritten_cells,
            overwritten_max=_nan_max(self.overwritten_max, other.overwritten_max),
            nan_mismatches=self.nan_mismatches + other.nan_mismatches,
            ours_negative=self.ours_negative + other.ours_negative,
        )


def _nan_max(first: float, second: float) -> float:
    if math.isnan(first):
        return second
    if math.isnan(second):
        return first
    return max(first, second)


def compare_matrices(
    comparison: Comparison,
    ours: np.ndarray,
    other: np.ndarray,
    layers: tuple[list[str], list[str]],
    overwritten: tuple[set[str], set[str]],
) -> Agreement:
    """Return the agreement of two matrices of one comparison.

    ``layers`` are the row and column layer names, ``overwritten`` the row and column
    layers whose output is overwritten after its hook fires.
    """
    if ours.shape != other.shape:
        raise ValueError(f"{comparison}: matrix shapes differ, ours {ours.shape}, other {other.shape}")
    rows, columns = layers
    overwritten_rows = np.array([name in overwritten[0] for name in rows], dtype=bool)
    overwritten_columns = np.array([name in overwritten[1] for name in columns], dtype=bool)
    finite = np.isfinite(ours) & np.isfinite(other)
    overwritten_cells = overwritten_rows[:, None] | overwritten_columns[None, :]
    difference = np.abs(ours - other)

    def largest(mask: np.ndarray) -> float:
        return float(difference[mask].max()) if mask.any() else math.nan

    clean = finite & ~overwritten_cells
    dirty = finite & overwritten_cells
    clean_worst = ""
    if clean.any():
        row, column = np.unravel_index(np.where(clean, difference, -1.0).argmax(), difference.shape)
        model_x, model_y, depth = comparison
        clean_worst = (
            f"{model_x} `{rows[row]}` vs {model_y} `{columns[column]}` at depth {depth}: "
            f"ours {ours[row, column]:.6g}, other {other[row, column]:.6g}"
        )
    return Agreement(
        clean_cells=int(clean.sum()),
        clean_max=largest(clean),
        clean_worst=clean_worst,
        clean_above=int((clean & (difference > AGREEMENT_THRESHOLD)).sum()),
        overwritten_cells=int(dirty.sum()),
        overwritten_max=largest(dirty),
        nan_mismatches=int((np.isfinite(ours) != np.isfinite(other)).sum()),
        ours_negative=int((finite & (ours < 0)).sum()),
    )


def workload_agreement(result: WorkloadResult, matrices: dict[Comparison, np.ndarray]) -> Agreement:
    """Combine the agreement of ours with ``matrices`` over every comparison of a workload."""
    ours = result.tools[OURS].matrices
    total = Agreement()
    for comparison, matrix in matrices.items():
        model_x, model_y, depth = comparison
        overwritten = (
            set(result.overwritten.get((model_x, depth), [])),
            set(result.overwritten.get((model_y, depth), [])),
        )
        total = total.add(compare_matrices(comparison, ours[comparison], matrix, result.layers[comparison], overwritten))
    return total


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def _difference(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1e}"


def _code_list(names: Sequence[str]) -> str:
    return ", ".join(f"`{name}`" for name in names) if names else "none"


@dataclasses.dataclass
class Page:
    """The results page: how the run was made and one section per workload."""

    command: str
    started: str
    machine: str
    load_before: tuple[float, float, float]
    versions: dict[str, str | None]
    repository: str
    peer_python: str
    peer_versions: dict[str, str | None]
    peers: list[str]
    repetitions: int
    warmup: int
    quick: bool
    work_dir: Path
    workloads: list[WorkloadResult] = dataclasses.field(default_factory=list)
    memory_check: list[tuple[Workload, ToolRuns]] | None = None
    load_after: tuple[float, float, float] | None = None
    benchmark_peak_rss_kib: int | None = None

    def render(self) -> str:
        lines = self._header() + self._method()
        for result in self.workloads:
            lines += _workload_section(result)
        if self.memory_check is not None:
            lines += _memory_section(self.memory_check)
        return "\n".join(lines) + "\n"

    def _header(self) -> list[str]:
        threads = sorted(
            {
                measurement.torch_threads
                for result in self.workloads
                for tool in result.tools.values()
                for measurement in tool.measurements
                if measurement.torch_threads is not None
            }
        )
        local = ", ".join(f"{name} {version or '(not installed)'}" for name, version in self.versions.items())
        peer_versions = ", ".join(
            f"{peer} {self.peer_versions.get(peer) or '(not installed)'}" for peer in self.peers
        )
        load_after = "n/a" if self.load_after is None else ", ".join(f"{value:.2f}" for value in self.load_after)
        order = "; ".join([OURS, FLOOR, FLOOR_AS_OURS, f"{OURS_API} (workloads of one pair)", *self.peers])
        lines = [
            "# Benchmark: our CKA engine and three public CKA packages",
            "",
            "Written by `bench/benchmark.py`. `bench/README.md` says how to install the peers and rerun it.",
            "",
        ]
        if self.quick:
            lines += [
                "**Quick run: small versions of the workloads, to check that every tool works. "
                "These numbers do not measure speed.**",
                "",
            ]
        lines += [
            f"- Command: `{self.command}`",
            f"- Date: {self.started}",
            f"- Machine: {self.machine}; torch threads per process: {', '.join(map(str, threads)) or 'n/a'}",
            f"- Load average over 1, 5 and 15 minutes: "
            f"{', '.join(f'{value:.2f}' for value in self.load_before)} at the start, {load_after} at the end",
            f"- Versions: {local}",
            f"- Repository: {self.repository}",
            f"- Peers, run by `{self.peer_python}` (Python {self.peer_versions.get('python')}, "
            f"torch {self.peer_versions.get('torch')}): {peer_versions}",
            f"- Rounds: {self.warmup} warm-up round(s), not counted, then {self.repetitions} counted "
            f"round(s). In each round the tools run one after another in this order: {order}. "
            "Times and memory are medians over the counted rounds.",
            f"- Matrices, logs and inputs of every process: `{self.work_dir}`",
            "",
        ]
        return lines

    def _method(self) -> list[str]:
        return [
            "## How the numbers are measured",
            "",
            "Every measurement runs in its own, fresh process, and no tool's time includes building "
            "the models (torchvision, `weights=None`, `torch.manual_seed(0)` before each model).",
            "",
            "- **ours**: `engine.run_plan(plan, progress=False, cache_dir=None)` with `cache=0`, after "
            "`engine.keep_freed_memory()`, which `main_feat_maps.py` calls for CPU runs: glibc then "
            "serves large tensors from memory freed earlier instead of mapping fresh pages. The engine "
            "runs models with convolutions channels last on the CPU. The "
            "time is `timings[\"total_s\"] - timings[\"build_s\"]`: it includes opening the "
            "`sample_photos` images, resizing and normalising them, tracing each model on 2 images, "
            "the forward passes and the CKA. The other tools start from the preprocessed float32 "
            "array, made by the engine's own `data` functions, so every tool sees the same tensors.",
            "- **floor**: each model's forward pass over every batch under `torch.inference_mode()`, "
            "nothing else, with glibc's default settings, under which every peer runs. No CKA tool "
            "with those settings can be faster.",
            f"- **{FLOOR_AS_OURS}**: the floor after `engine.keep_freed_memory()`, with models and "
            "batches laid out channels last (`torch.channels_last`), as ours runs them on the CPU. "
            "No CKA tool with those settings can be faster, and the peers would gain from them too.",
            f"- **{OURS_API}**: `engine.compare_models` on the preprocessed float32 array and on models "
            "built before the timed part, as the peers get them (`bench/run_api.py`). It runs on "
            "workloads of one pair, and its time leaves out what ours spends on reading and "
            "resizing the images.",
            "- **peers**: `bench/peers.py`, the CKA call of each package on already built models. "
            "The peers compare one pair at a time, so on a workload with several pairs or depths "
            "they run once per pair and depth. Their time is then the sum of those runs, and their "
            "memory the largest of them.",
            "- **median s** and **range s**: the median, smallest and largest time over the counted "
            "rounds. **time / floor**, **time / floor as ours** and **time / ours**: the tool's median "
            "time divided by the floor's, by the floor's as ours runs, and by ours.",
            "- **peak RSS**: `ru_maxrss` of the process at the end of the timed part, which includes "
            "the Python interpreter, torch, the models and the images. **RSS increase**: that "
            "peak minus the process's RSS right before the timed part. On Linux the `ru_maxrss` of a "
            "new process starts from the RSS of the process that started it, so the benchmark "
            f"process imports no torch: {self._benchmark_rss_note()}",
            "- **max abs diff from ours**: the largest `|ours - tool|` over the cells finite in both "
            "matrices, for the tools that compute minibatch CKA with unbiased HSIC, as ours does.",
            "",
        ]

    def _measured_peaks_kib(self) -> list[int]:
        runs = [tool for result in self.workloads for tool in result.tools.values()]
        runs += [tool for _, tool in self.memory_check or []]
        return [measurement.peak_rss_kib for tool in runs for measurement in tool.measurements]

    def _benchmark_rss_note(self) -> str:
        if self.benchmark_peak_rss_kib is None:
            return "its own peak RSS was not recorded."
        own = f"its own peak RSS was {_mib(self.benchmark_peak_rss_kib)} MiB"
        peaks = self._measured_peaks_kib()
        if peaks and self.benchmark_peak_rss_kib >= min(peaks):
            return f"{own}, which is not below every peak reported here, so some peaks may be too high."
        return f"{own}, below every peak reported here."


def _workload_section(result: WorkloadResult) -> list[str]:
    workload = result.workload
    lines = [f"## {workload.key} {workload.title}", "", f"Models: {workload.describe()}.", ""]
    lines += _timing_table(result)
    lines += _workload_notes(result)
    return lines + _agreement_section(result)


def _timing_table(result: WorkloadResult) -> list[str]:
    lines = [
        "| tool | median s | range s | time / floor | time / floor as ours | time / ours | peak RSS MiB "
        "| RSS increase MiB | max abs diff from ours |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tool in result.tools.values():
        if tool.status is not None or not tool.measurements:
            lines.append(f"| {tool.tool} | {tool.status or 'no runs'} | | | | | | | |")
            continue

        seconds = [measurement.seconds for measurement in tool.measurements]
        median = tool.median("seconds")
        ratios = [_ratio(median, result.tools.get(name)) for name in (FLOOR, FLOOR_AS_OURS, OURS)]
        if tool.tool in (OURS, FLOOR, FLOOR_AS_OURS):
            difference = ""
        else:
            difference = _difference(workload_agreement(result, tool.matrices).all_max)
        lines.append(
            f"| {tool.tool} | {median:.2f} | {min(seconds):.2f}-{max(seconds):.2f} | {' | '.join(ratios)} "
            f"| {_mib(tool.median('peak_rss_kib'))} | {_mib(tool.median('rss_increase_kib'))} "
            f"| {difference} |"
        )
    lines.append("")
    return lines


def _ratio(seconds: float, denominator: "ToolRuns | None") -> str:
    if denominator is None or not denominator.measurements:
        return "n/a"
    return f"{seconds / denominator.median('seconds'):.2f}"


def _workload_notes(result: WorkloadResult) -> list[str]:
    ours = result.tools[OURS]
    floor = result.tools[FLOOR]
    notes = []
    if ours.measurements:
        notes.append(f"Ours with model building (`total_s`): median {ours.median('total_seconds'):.2f} s.")
        differences = [m.images_max_difference for m in ours.measurements if m.images_max_difference is not None]
        if differences:
            notes.append(
                "Largest difference between the engine's model inputs and the image array that the "
                f"other tools read: {max(differences):g}."
            )
    if ours.measurements and floor.measurements and floor.measurements[0].model_bytes is not None:
        notes.append(
            "Ours builds its models inside the timed call and subtracts their build time, but its RSS "
            f"increase includes their weights, {floor.measurements[0].model_bytes / 2**20:.0f} MiB, "
            "which the other tools load before their timed part."
        )
    comparisons = len(result.workload.comparisons())
    if comparisons > 1:
        depths = len(result.workload.depths)
        notes.append(
            f"Ours runs the {comparisons} comparisons ({comparisons // depths} pairs x {depths} depths) "
            f"as one command that runs each model once, while the peers run {comparisons} processes per round."
        )
    if not notes:
        return []
    return [f"- {note}" for note in notes] + [""]


def _agreement_section(result: WorkloadResult) -> list[str]:
    others = {
        tool.tool: (tool.estimator or "", tool.matrices)
        for tool in result.tools.values()
        if tool.tool not in (OURS, OURS_API, FLOOR, FLOOR_AS_OURS) and tool.status is None and tool.matrices
    }
    if result.references:
        others[REFERENCE] = ("minibatch CKA, unbiased HSIC, float64, kernels computed in hook", result.references)
    if not others or not result.tools[OURS].matrices:
        return []

    lines = [
        f"### {result.workload.key} agreement with ours",
        "",
        "Overwritten layers are those whose output an in-place op changes after the layer's forward "
        "hook fires: an in-place ReLU, or a residual `+=`, that runs later in the forward pass. "
        "Hooks that keep the output tensor and read it after the forward pass, as torch-cka and "
        "pytorch-cka do, read wrong values for them. `bench/find_overwritten.py` finds them by "
        "comparing each output after the forward pass with a copy taken in the hook:",
        "",
    ]
    for (model, depth), names in result.overwritten.items():
        count = "1 layer" if len(names) == 1 else f"{len(names)} layers"
        lines.append(f"- {model} at depth {depth}, {count}: {_code_list(names)}")
    lines += [
        "",
        "A cell is overwritten when its row or its column layer is. Clean cells are the others.",
        "",
    ]
    agreements = {name: workload_agreement(result, matrices) for name, (_, matrices) in others.items()}
    lines += _agreement_table(others, agreements, result.reference_status)
    return lines + _agreement_summary(agreements)


def _agreement_table(others: dict, agreements: dict[str, Agreement], reference_status: str | None) -> list[str]:
    lines = [
        "| compared with | estimator | clean cells | max abs diff, clean | overwritten cells "
        "| max abs diff, overwritten |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, agreement in agreements.items():
        estimator = others[name][0]
        lines.append(
            f"| {name} | {estimator} | {agreement.clean_cells} | {_difference(agreement.clean_max)} "
            f"| {agreement.overwritten_cells} | {_difference(agreement.overwritten_max)} |"
        )
    if reference_status:
        lines.append(f"| {REFERENCE} | {reference_status} | | | | |")
    lines.append("")
    return lines


def _agreement_summary(agreements: dict[str, Agreement]) -> list[str]:
    """Return the paragraphs under the agreement table: large differences and their causes."""
    paragraphs = []
    above = {name: agreement for name, agreement in agreements.items() if agreement.clean_max > AGREEMENT_THRESHOLD}
    if above:
        cells = [
            f"{name}: {agreement.clean_above} of {agreement.clean_cells} clean cells, the largest "
            f"difference {_difference(agreement.clean_max)} at {agreement.clean_worst}"
            for name, agreement in above.items()
        ]
        paragraphs.append(
            f"Clean cells differ from ours by more than {AGREEMENT_THRESHOLD:g} for these tools: "
            + "; ".join(cells) + "."
        )
        agreeing = [
            name for name in ("ckatorch", REFERENCE)
            if name in agreements and name not in above and agreements[name].clean_cells
        ]
        if agreeing:
            verbs = ("reads", "agrees") if len(agreeing) == 1 else ("read", "agree")
            paragraphs.append(
                f"On the same cells, {' and '.join(agreeing)}, which {verbs[0]} each output inside its hook, "
                f"{verbs[1]} with ours within {AGREEMENT_THRESHOLD:g}, so these differences are errors of "
                "the tools listed above."
            )
    else:
        paragraphs.append(f"On clean cells, every tool listed is within {AGREEMENT_THRESHOLD:g} of ours.")

    references = [name for name in ("ckatorch", REFERENCE) if name in agreements]
    misreading = [name for name in ("torch-cka", "pytorch-cka") if name in agreements]
    if references and agreements[references[0]].overwritten_cells:
        parts = [f"{name} by at most {_difference(agreements[name].overwritten_max)}" for name in references]
        sentence = f"On overwritten cells, ours differs from {' and from '.join(parts)}"
        if misreading:
            peers = [f"{name} {_difference(agreements[name].overwritten_max)}" for name in misreading]
            sentence += f", while the hooks that read after the forward pass differ by up to: {', '.join(peers)}"
        paragraphs.append(sentence + ".")

    for name, agreement in agreements.items():
        if agreement.nan_mismatches:
            paragraphs.append(f"{name}: {agreement.nan_mismatches} cells are NaN in one matrix and finite in the other.")
    if "pytorch-cka" in agreements and agreements["pytorch-cka"].ours_negative:
        paragraphs.append(
            f"Ours has {agreements['pytorch-cka'].ours_negative} cells below 0, which pytorch-cka clamps to 0."
        )
    return [line for paragraph in paragraphs for line in (paragraph, "")]


def _memory_section(runs: list[tuple[Workload, ToolRuns]]) -> list[str]:
    (small, small_runs), (large, large_runs) = runs
    lines = [
        f"## Memory check: ours on {MEMORY_CHECK_BASE} with {small.batch_count} and {large.batch_count} batches",
        "",
        f"Our engine alone, on {MEMORY_CHECK_BASE}'s settings ({small.batch_size} images per batch) with "
        f"{small.image_count} and {large.image_count} images, the two runs alternating. The engine "
        "keeps at most 32 MiB of kernels and resized images in memory and the rest on disk, so its "
        "memory should not grow with the number of batches.",
        "",
        "| images | batches | median s | peak RSS MiB | RSS increase MiB |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload, tool in runs:
        if tool.status is not None or not tool.measurements:
            lines.append(f"| {workload.image_count} | {workload.batch_count} | {tool.status or 'no runs'} | | |")
            continue
        lines.append(
            f"| {workload.image_count} | {workload.batch_count} | {tool.median('seconds'):.2f} "
            f"| {_mib(tool.median('peak_rss_kib'))} | {_mib(tool.median('rss_increase_kib'))} |"
        )
    lines.append("")
    if small_runs.measurements and large_runs.measurements:
        peak_ratio = large_runs.median("peak_rss_kib") / small_runs.median("peak_rss_kib")
        increase_ratio = large_runs.median("rss_increase_kib") / max(small_runs.median("rss_increase_kib"), 1)
        lines += [
            f"Peak RSS ratio, {large.image_count} / {small.image_count} images: {peak_ratio:.2f}. "
            f"RSS increase ratio: {increase_ratio:.2f}.",
            "",
        ]
    return lines
