"""Writing a run's files: per pair a heatmap, a CSV and an NPZ; per run a JSON record."""

import contextlib
import csv
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import threading

import numpy as np
import torch

from plotting import plot_cka_heatmap

from .allocator import allocator_setting
from .atomic import atomic_path
from .run import PairResult, RunResult

__all__ = ["RECORD_NAME", "library_versions", "pair_title", "save_cka_matrix", "write_outputs"]

logger = logging.getLogger(__name__)

RECORD_NAME = "run_record.json"
_DPI = 150  # sharp enough to read 6-point tick labels when zoomed in

_PACKAGES = (
    "torch",
    "torchvision",
    "pretrainedmodels",
    "timm",
    "safetensors",
    "numpy",
    "scikit-image",
    "matplotlib",
    "pillow",
)


def library_versions() -> dict[str, str]:
    """Return the installed versions of the packages that change the numbers or figures."""
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def pair_title(result: PairResult, image_count: int) -> str:
    """Return the heatmap title: both models, the scope, the CKA type and the images."""
    task = result.task
    estimator = task.kernel.estimator
    return f"{result.title}\n{task.cka_type} ({estimator} HSIC), {image_count} images"


def _write_csv(path: str, matrix: np.ndarray, rows, columns, label_x: str, label_y: str) -> None:
    with atomic_path(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"{label_x} \\ {label_y}", *columns])
        for name, values in zip(rows, matrix.tolist()):
            writer.writerow([name, *(repr(value) for value in values)])


def save_cka_matrix(
    base_path: str,
    matrix,
    rows: list[str],
    columns: list[str],
    label_x: str,
    label_y: str,
    title: str,
    metadata: dict | None = None,
) -> list[str]:
    """Write a CKA matrix as a heatmap PNG, a CSV and an NPZ next to each other.

    The CSV has the column layer names as header and the row layer name first on each
    row. The NPZ contains ``cka``, ``rows``, ``columns``, ``model_x``, ``model_y`` and every
    entry of ``metadata``. Each file is written under a temporary name and renamed, so
    no reader sees half a file.

    Args:
        base_path: path without extension.
        matrix: ``(rows, columns)`` CKA values.
        rows: layer names of ``label_x``, the vertical axis.
        columns: layer names of ``label_y``, the horizontal axis.
        label_x: name of the rows' model.
        label_y: name of the columns' model.
        title: heatmap title.
        metadata: extra scalar entries for the NPZ.

    Returns:
        The paths written: PNG, CSV, NPZ.
    """
    values = np.asarray(matrix, dtype=np.float64)
    png, csv_path, npz = f"{base_path}.png", f"{base_path}.csv", f"{base_path}.npz"

    figure = plot_cka_heatmap(
        values, rows, columns, title, row_axis=f"{label_x} layers", column_axis=f"{label_y} layers"
    )
    with atomic_path(png) as partial:
        figure.savefig(partial, dpi=_DPI, format="png")

    _write_csv(csv_path, values, rows, columns, label_x, label_y)

    with atomic_path(npz) as partial, open(partial, "wb") as handle:
        np.savez(
            handle,
            cka=values,
            rows=np.array(rows),
            columns=np.array(columns),
            model_x=label_x,
            model_y=label_y,
            **(metadata or {}),
        )
    return [png, csv_path, npz]


def _nan_cells(result: PairResult) -> list[list[str]]:
    rows, columns = np.nonzero(np.isnan(result.matrix.numpy()))
    return [[result.rows[i], result.columns[j]] for i, j in zip(rows.tolist(), columns.tolist())]


def _peak_memory(device: str) -> dict[str, float]:
    """Return the process's peak resident memory and, on CUDA, peak allocated GPU memory, in MiB."""
    import resource

    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2
    peak = {"resident_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)}
    if device.startswith("cuda"):
        peak["cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated(torch.device(device)) / 1024**2, 1)
    return peak


def _device_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _record(result: RunResult, files: dict[str, list[str]], argv: list[str], cache_dir: str | None) -> dict:
    plan = result.plan
    models = []
    for prepared in result.models:
        spec = prepared.spec
        models.append(
            {
                "label": spec.label,
                "library": spec.library,
                "name": spec.name,
                "pretrained": spec.pretrained,
                "input_size": spec.input_size,
                "seed": spec.seed,
                "weights": spec.weights,
                "hooked_layers": len(prepared.layers),
                "cache_key": prepared.key,
                "batches_from_cache": prepared.cached_batches,
                "memory_layout": "channels last" if prepared.channels_last else "channels first",
                "scopes": [
                    {
                        "depth_requested": depth,
                        "conv_only": conv_only,
                        "depth_used": selection.depth,
                        "layers": [layer.name for layer in selection.layers],
                        "dropped": selection.dropped,
                        "containers_expanded": selection.expanded,
                        "output_layer_removed": selection.removed_output,
                    }
                    for (depth, conv_only), selection in prepared.selections.items()
                ],
            }
        )

    pairs = []
    for pair in result.pairs:
        task = pair.task
        pairs.append(
            {
                "title": pair.title,
                "model_x": task.model_x.label,
                "model_y": task.model_y.label,
                "depth": None if task.conv_only else task.depth,
                "conv_only": task.conv_only,
                "depth_used": [pair.depth_x, pair.depth_y],
                "cka_type": task.cka_type,
                "kernel": dataclasses.asdict(task.kernel),
                "shape": list(pair.matrix.shape),
                "nan_cells": _nan_cells(pair),
                "files": files[task.stem],
            }
        )

    options = dataclasses.asdict(plan.options)
    return {
        "command": shlex.join([sys.executable, *argv]) if argv else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "library": plan.library,
        "device": _device_description(plan.device),
        "processes": result.context.world_size,
        "cache_dir": cache_dir,
        "versions": library_versions(),
        "images": {
            "dataset": plan.options.dataset,
            "description": result.images.description,
            "count": len(result.images),
            "batch_size": plan.options.batch_size,
            "batches": plan.options.dataloader_size,
            "seed": plan.options.seed,
            "indices": result.images.indices,
        },
        "kernel_size_range": list(plan.kernel_range),
        "models": models,
        "pairs": pairs,
        "timings_s": {name: round(value, 3) for name, value in result.timings.items()},
        "allocator": allocator_setting(),
        "peak_memory": _peak_memory(plan.device),
    }


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold SIGINT and SIGTERM back while the block runs, so it finishes as a whole.

    A signal that arrives meanwhile is logged and dropped: the block is short, and
    stopping inside it would leave new files beside old ones.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in signals}
    for number in signals:
        signal.signal(number, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            logger.warning("interrupt received while moving the finished files into place; they are complete")


def write_outputs(
    result: RunResult, argv: list[str] | None = None, cache_dir: str | None = None
) -> dict[str, list[str]]:
    """Write every pair's PNG, CSV and NPZ, then the run record, into the output folder.

    The files are first written into a hidden staging folder inside the output folder.
    They are then moved into place together, with interrupts held back. So an
    interrupted run leaves either all of its files or none, never a mix with an earlier
    run's. Files
    from an earlier run with the same names are replaced.

    Args:
        result: what ``run_plan`` returned.
        argv: the command line, recorded verbatim; ``sys.argv`` for the CLI.
        cache_dir: the kernel cache folder the run used, for the record.

    Returns:
        ``{task stem: [paths written]}``, plus ``"record"`` for the run record.
    """
    folder = result.plan.options.output_path
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".cka-partial-", dir=folder)
    image_count = len(result.images)
    try:
        staged: dict[str, list[str]] = {}
        for pair in result.pairs:
            task = pair.task
            staged[task.stem] = save_cka_matrix(
                os.path.join(staging, task.stem),
                pair.matrix.numpy(),
                pair.rows,
                pair.columns,
                task.model_x.label,
                task.model_y.label,
                pair_title(pair, image_count),
                metadata={
                    "cka_type": task.cka_type,
                    "estimator": task.kernel.estimator,
                    "depth": task.depth,
                    "conv_only": task.conv_only,
                },
            )
        files = {
            stem: [os.path.join(folder, os.path.basename(path)) for path in paths]
            for stem, paths in staged.items()
        }
        files["record"] = [os.path.join(folder, RECORD_NAME)]
        record = _json_safe(_record(result, files, list(argv or []), cache_dir))
        with open(os.path.join(staging, RECORD_NAME), "w") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")

        with _interrupts_deferred():
            for paths in files.values():
                for path in paths:
                    os.replace(os.path.join(staging, os.path.basename(path)), path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files
