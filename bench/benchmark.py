#!/usr/bin/env python3
"""Benchmark our CKA engine against the public CKA packages torch-cka, pytorch-cka and ckatorch.

For each workload of ``bench/workloads.py`` the tools run in turn, each measurement in a
fresh process: our engine (``bench/run_ours.py``), the bare forward passes of the models
(``bench/run_floor.py``, the floor, once with glibc's default settings and once with the
allocator set as ours runs) and every installed peer (``bench/peers.py``). One
warm-up round is not counted. The rounds after it record the wall time of each tool's
timed part, its peak RSS and the RSS increase over the process's RSS right before the
timed part. Model construction is never timed. The CKA matrices are compared with ours,
with ckatorch's float64 HSIC and, for the pair workloads, with the float64 numpy
reference of ``bench/reference.py``. A memory check then runs our engine alone on W1
with few and with many batches. The results go to a Markdown page, by default
``bench/RESULTS.md``.

Run it from the repository root, on a machine with nothing else running:

    python bench/benchmark.py --peer_python /work/bench-venv/bin/python

``--quick`` runs small versions of the workloads once, to check that everything works.
Its numbers do not measure speed. This script is not part of the test suite.
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import report
from report import FLOOR, FLOOR_AS_OURS, OURS, OURS_API, Comparison, Measurement, ToolRuns, WorkloadResult
from workloads import DATASET, MEMORY_CHECK_KEY, SEED, Workload, memory_check_workloads, workloads

BENCH_DIR = Path(__file__).resolve().parent
REPOSITORY_ROOT = BENCH_DIR.parent

PEERS = ("torch-cka", "pytorch-cka", "ckatorch")
EXIT_UNSUPPORTED_KERNEL = 3  # bench/peers.py's exit status for a kernel the peer lacks
DEFAULT_REPETITIONS = 3
DEFAULT_WARMUP = 1
# NOTE: an estimate from the quick run: no single process of the full run should need more
# than a few minutes on 2 cores. Raise it on a slower machine.
DEFAULT_TIMEOUT_S = 3600.0


class ToolFailure(RuntimeError):
    """A helper process exited with an error, or ran past the timeout."""


@dataclasses.dataclass
class Settings:
    """Command-line settings that every step needs."""

    repetitions: int
    warmup: int
    quick: bool
    peer_python: str
    peers: dict[str, str | None]  # peer -> installed version, or None when not installed
    work_dir: Path
    timeout_s: float
    image_files: dict[tuple[int, int], Path] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


def run_helper(command: Sequence[str], log_path: Path, timeout_s: float, cwd: Path, env=None):
    """Run one helper process, write its output to ``log_path`` and return it.

    Raises:
        ToolFailure: when it runs past ``timeout_s``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        completed = subprocess.run(
            list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as error:
        raise ToolFailure(f"timed out after {timeout_s:.0f} s: {shlex.join(command)}") from error
    log_path.write_text(
        f"$ {shlex.join(command)}\n# exit status {completed.returncode}\n"
        f"# stdout\n{completed.stdout}\n# stderr\n{completed.stderr}"
    )
    return completed


def check_exit(completed, log_path: Path) -> None:
    """Raise ToolFailure with the last line of stderr unless the process succeeded."""
    if completed.returncode == 0:
        return
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    last_line = lines[-1].strip() if lines else "no error output"
    raise ToolFailure(f"exit status {completed.returncode}: {last_line} (log: {log_path})")


def environment_without_pythonpath() -> dict[str, str]:
    """Return os.environ without PYTHONPATH, so that peers cannot import the repository.

    pytorch-cka's package is named ``cka`` like the repository's.
    """
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def run_ours(
    workload: Workload, out: Path, settings: Settings, images: Path | None = None
) -> tuple[Measurement, dict, dict]:
    """Run ``run_ours.py`` once and return the measurement, matrices and layer names.

    With ``images``, the engine's model inputs are checked against that array.
    """
    command = [
        sys.executable, str(BENCH_DIR / "run_ours.py"),
        "--models", *workload.models,
        "--compare_all", str(int(workload.compare_all)),
        "--depths", *(str(depth) for depth in workload.depths),
        "--kernel", workload.kernel,
        "--image_size", str(workload.image_size),
        "--batch_size", str(workload.batch_size),
        "--batch_count", str(workload.batch_count),
        "--out", str(out),
    ]
    if images is not None:
        command += ["--check_images", str(images)]
    log_path = out.with_suffix(".log")
    check_exit(run_helper(command, log_path, settings.timeout_s, REPOSITORY_ROOT), log_path)

    data = load_npz(out)
    matrices = {}
    layers = {}
    for index, (model_x, model_y, depth) in enumerate(json.loads(str(data["comparisons"]))):
        comparison = (model_x, model_y, int(depth))
        matrices[comparison] = data[f"matrix_{index}"]
        layers[comparison] = (data[f"rows_{index}"].tolist(), data[f"columns_{index}"].tolist())
    measurement = Measurement(
        seconds=float(data["seconds"]),
        peak_rss_kib=int(data["peak_rss_kib"]),
        rss_increase_kib=int(data["peak_rss_kib"]) - int(data["rss_kib_before"]),
        total_seconds=float(data["total_seconds"]),
        torch_threads=int(data["torch_num_threads"]),
        images_max_difference=float(data["images_max_difference"]) if "images_max_difference" in data else None,
    )
    return measurement, matrices, layers


def run_floor(
    workload: Workload, images: Path, out: Path, settings: Settings, as_ours: bool = False
) -> Measurement:
    """Run ``run_floor.py`` once over every model of the workload.

    With ``as_ours``, the floor keeps freed memory and runs channels last, as ours does.

    Raises:
        ToolFailure: when the process fails, or with ``as_ours`` the allocator setting did
            not apply.
    """
    command = [
        sys.executable, str(BENCH_DIR / "run_floor.py"),
        "--models", *workload.models,
        "--images", str(images),
        "--batch_size", str(workload.batch_size),
        "--seed", str(SEED),
        "--keep_freed_memory", str(int(as_ours)),
        "--channels_last", str(int(as_ours)),
        "--out", str(out),
    ]
    log_path = out.with_suffix(".log")
    check_exit(run_helper(command, log_path, settings.timeout_s, settings.work_dir), log_path)
    data = load_npz(out)
    if as_ours and not bool(data["freed_memory_kept"]):
        raise ToolFailure(
            "engine.keep_freed_memory did not apply: no glibc, or the environment sets the allocator"
        )
    return Measurement(
        seconds=float(data["seconds"]),
        peak_rss_kib=int(data["peak_rss_kib"]),
        rss_increase_kib=int(data["peak_rss_kib"]) - int(data["rss_kib_before"]),
        torch_threads=int(data["torch_num_threads"]),
        model_bytes=int(data["model_bytes"]),
    )


def run_api(workload: Workload, images: Path, out: Path, settings: Settings) -> tuple[Measurement, dict]:
    """Run ``run_api.py`` once on the workload's single pair and return the measurement and matrix."""
    (model_x, model_y, depth), = workload.comparisons()
    command = [
        sys.executable, str(BENCH_DIR / "run_api.py"),
        "--models", model_x, model_y,
        "--depth", str(depth),
        "--kernel", workload.kernel,
        "--images", str(images),
        "--batch_size", str(workload.batch_size),
        "--out", str(out),
    ]
    log_path = out.with_suffix(".log")
    check_exit(run_helper(command, log_path, settings.timeout_s, settings.work_dir), log_path)
    data = load_npz(out)
    measurement = Measurement(
        seconds=float(data["seconds"]),
        peak_rss_kib=int(data["peak_rss_kib"]),
        rss_increase_kib=int(data["peak_rss_kib"]) - int(data["rss_kib_before"]),
        torch_threads=int(data["torch_num_threads"]),
        model_bytes=int(data["model_bytes"]),
    )
    return measurement, {(model_x, model_y, depth): data["matrix_0"]}


class UnsupportedKernel(Exception):
    """The peer does not implement the workload's kernel."""


def run_peer(
    peer: str,
    workload: Workload,
    layer_files: dict[Comparison, Path],
    images: Path,
    round_dir: Path,
    settings: Settings,
) -> tuple[Measurement, dict, str]:
    """Run ``peers.py`` once per comparison and return the measurement, matrices and estimator.

    The seconds of the comparisons add up, and the memory is the largest over them.

    Raises:
        UnsupportedKernel: when ``peers.py`` exits with status 3.
        ToolFailure: when a run fails.
    """
    seconds = 0.0
    peak_rss = 0
    increase = 0
    threads = set()
    matrices = {}
    estimator = ""
    for comparison, layer_file in layer_files.items():
        model_x, model_y, depth = comparison
        out = round_dir / f"{peer}_{model_x}_{model_y}_depth{depth}.npz"
        command = [
            settings.peer_python, str(BENCH_DIR / "peers.py"),
            "--peer", peer,
            "--models", model_x, model_y,
            "--layers", str(layer_file),
            "--images", str(images),
            "--batch_size", str(workload.batch_size),
            "--kernel", workload.kernel,
            "--seed", str(SEED),
            "--out", str(out),
        ]
        log_path = out.with_suffix(".log")
        completed = run_helper(
            command, log_path, settings.timeout_s, settings.work_dir, environment_without_pythonpath()
        )
        if completed.returncode == EXIT_UNSUPPORTED_KERNEL:
            raise UnsupportedKernel(completed.stderr.strip())
        check_exit(completed, log_path)

        data = load_npz(out)
        seconds += float(data["cka_seconds"])
        peak_rss = max(peak_rss, int(data["peak_rss_kib"]))
        increase = max(increase, int(data["peak_rss_kib"]) - int(data["rss_kib_before_cka"]))
        threads.add(int(data["torch_num_threads"]))
        matrices[comparison] = data["cka"]
        estimator = str(data["estimator"])
    measurement = Measurement(
        seconds=seconds,
        peak_rss_kib=peak_rss,
        rss_increase_kib=increase,
        torch_threads=threads.pop() if len(threads) == 1 else None,
    )
    return measurement, matrices, estimator


def run_reference(
    workload: Workload, comparison: Comparison, layer_file: Path, images: Path, out: Path, settings: Settings
) -> np.ndarray:
    """Compute the float64 numpy reference of one comparison with ``reference.py``."""
    model_x, model_y, _ = comparison
    command = [
        sys.executable, str(BENCH_DIR / "reference.py"),
        "--models", model_x, model_y,
        "--layers", str(layer_file),
        "--images", str(images),
        "--batch_size", str(workload.batch_size),
        "--kernel", workload.kernel,
        "--seed", str(SEED),
        "--out", str(out),
    ]
    log_path = out.with_suffix(".log")
    check_exit(run_helper(command, log_path, settings.timeout_s, settings.work_dir), log_path)
    return load_npz(out)["cka"]


# ---------------------------------------------------------------------------------------
# Inputs shared by every tool
# ---------------------------------------------------------------------------------------


def prepare_images(workload: Workload, settings: Settings) -> Path:
    """Return the workload's model inputs as a .npy file, made once per run by ``prepare_images.py``.

    The file is made afresh by every run of this script, so that it matches the engine's
    code of this run.
    """
    key = (workload.image_count, workload.image_size)
    if key in settings.image_files:
        return settings.image_files[key]
    path = settings.work_dir / f"images_{DATASET}_{workload.image_count}x{workload.image_size}px.npy"
    command = [
        sys.executable, str(BENCH_DIR / "prepare_images.py"),
        "--models", *workload.models,
        "--image_size", str(workload.image_size),
        "--image_count", str(workload.image_count),
        "--batch_size", str(workload.batch_size),
        "--out", str(path),
    ]
    log_path = path.with_suffix(".log")
    try:
        check_exit(run_helper(command, log_path, settings.timeout_s, REPOSITORY_ROOT), log_path)
    except ToolFailure as error:
        raise SystemExit(f"error: failed to prepare the images of {workload.key}: {error}") from error
    settings.image_files[key] = path
    return path


def write_layer_files(layers: dict[Comparison, tuple[list[str], list[str]]], directory: Path) -> dict:
    """Write each comparison's two layer lists as the JSON that peers.py reads."""
    files = {}
    for comparison, (rows, columns) in layers.items():
        repeated = [name for name in rows + columns if "#" in name]
        if repeated:
            raise SystemExit(
                f"error: layers {repeated} run more than once per forward pass; the peers hook "
                "modules by name and cannot tell the calls apart, so choose models without them"
            )
        model_x, model_y, depth = comparison
        path = directory / f"layers_{model_x}_{model_y}_depth{depth}.json"
        path.write_text(json.dumps([rows, columns]))
        files[comparison] = path
    return files


def find_overwritten(result: WorkloadResult, images: Path, directory: Path, settings: Settings) -> None:
    """Fill ``result.overwritten`` with each model's layers that in-place ops change later.

    Raises:
        ToolFailure: when ``find_overwritten.py`` fails.
    """
    requested: dict[str, dict[str, list[str]]] = {}
    for (model_x, model_y, depth), (rows, columns) in result.layers.items():
        requested.setdefault(model_x, {})[str(depth)] = rows
        requested.setdefault(model_y, {})[str(depth)] = columns
    layers_path = directory / "overwritten_request.json"
    layers_path.write_text(json.dumps(requested))
    out = directory / "overwritten.json"
    command = [
        sys.executable, str(BENCH_DIR / "find_overwritten.py"),
        "--layers", str(layers_path),
        "--images", str(images),
        "--seed", str(SEED),
        "--out", str(out),
    ]
    log_path = out.with_suffix(".log")
    check_exit(run_helper(command, log_path, settings.timeout_s, settings.work_dir), log_path)
    for model, by_depth in json.loads(out.read_text()).items():
        for depth, names in by_depth.items():
            result.overwritten[model, int(depth)] = names


# ---------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------


def run_workload(workload: Workload, settings: Settings) -> WorkloadResult:
    """Run every tool on one workload in turn, warm-up rounds first."""
    directory = settings.work_dir / workload.key
    directory.mkdir(parents=True, exist_ok=True)
    images = prepare_images(workload, settings)

    tools = {OURS: ToolRuns(OURS), FLOOR: ToolRuns(FLOOR), FLOOR_AS_OURS: ToolRuns(FLOOR_AS_OURS)}
    if len(workload.comparisons()) == 1:
        tools[OURS_API] = ToolRuns(OURS_API)
    for peer, version in settings.peers.items():
        tools[peer] = ToolRuns(peer, status=None if version else "not installed")
    result = WorkloadResult(workload, tools)
    layer_files: dict[Comparison, Path] = {}

    rounds = settings.warmup + settings.repetitions
    for round_index in range(rounds):
        counted = round_index >= settings.warmup
        label = f"round {round_index + 1 - settings.warmup}" if counted else f"warm-up {round_index + 1}"
        round_dir = directory / f"round{round_index}"
        round_dir.mkdir(exist_ok=True)
        for tool in tools.values():
            if tool.status is not None:
                continue
            started = time.perf_counter()
            try:
                if tool.tool == OURS:
                    measurement, matrices, layers = run_ours(workload, round_dir / "ours.npz", settings, images)
                    if not layer_files:
                        result.layers = layers
                        layer_files = write_layer_files(layers, directory)
                elif tool.tool in (FLOOR, FLOOR_AS_OURS):
                    as_ours = tool.tool == FLOOR_AS_OURS
                    out = round_dir / ("floor_as_ours.npz" if as_ours else "floor.npz")
                    measurement = run_floor(workload, images, out, settings, as_ours=as_ours)
                    matrices = {}
                elif tool.tool == OURS_API:
                    measurement, matrices = run_api(workload, images, round_dir / "api.npz", settings)
                else:
                    measurement, matrices, tool.estimator = run_peer(
                        tool.tool, workload, layer_files, images, round_dir, settings
                    )
            except UnsupportedKernel as error:
                tool.status = f"no minibatch {workload.kernel.upper()} kernel"
                print(f"{workload.key} {tool.tool}: skipped, {error}", flush=True)
                continue
            except ToolFailure as error:
                tool.status = f"failed: {error}"
                print(f"{workload.key} {tool.tool}: FAILED, {error}", flush=True)
                if tool.tool == OURS and not layer_files:
                    for other in tools.values():
                        other.status = other.status or "not run: our engine failed, so no layer lists"
                    return result
                continue
            print(
                f"{workload.key} {label} {tool.tool}: {measurement.seconds:.2f} s timed, "
                f"{time.perf_counter() - started:.0f} s with process start, "
                f"peak RSS {measurement.peak_rss_kib / 1024:.0f} MiB",
                flush=True,
            )
            if counted:
                tool.measurements.append(measurement)
                tool.matrices = matrices

    try:
        find_overwritten(result, images, directory, settings)
    except ToolFailure as error:
        print(f"{workload.key}: finding the overwritten layers FAILED, {error}", flush=True)
    if workload.reference:
        for comparison, layer_file in layer_files.items():
            started = time.perf_counter()
            try:
                out = directory / f"reference_{comparison[0]}_{comparison[1]}_depth{comparison[2]}.npz"
                result.references[comparison] = run_reference(workload, comparison, layer_file, images, out, settings)
            except ToolFailure as error:
                result.reference_status = f"failed: {error}"
                print(f"{workload.key} reference: FAILED, {error}", flush=True)
                break
            print(f"{workload.key} reference: {time.perf_counter() - started:.0f} s", flush=True)
    return result


def run_memory_check(settings: Settings) -> list[tuple[Workload, ToolRuns]]:
    """Run our engine alone on W1 with few and with many batches, in turn."""
    runs = [(workload, ToolRuns(OURS)) for workload in memory_check_workloads(settings.quick)]
    for round_index in range(settings.warmup + settings.repetitions):
        counted = round_index >= settings.warmup
        for workload, tool in runs:
            if tool.status is not None:
                continue
            out = settings.work_dir / workload.key / f"round{round_index}" / "ours.npz"
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                measurement, _, _ = run_ours(workload, out, settings)
            except ToolFailure as error:
                tool.status = f"failed: {error}"
                print(f"memory check, {workload.image_count} images: FAILED, {error}", flush=True)
                continue
            print(
                f"memory check, {workload.image_count} images: {measurement.seconds:.2f} s, "
                f"peak RSS {measurement.peak_rss_kib / 1024:.0f} MiB",
                flush=True,
            )
            if counted:
                tool.measurements.append(measurement)
    return runs


# ---------------------------------------------------------------------------------------
# Machine, versions and the command line
# ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def describe_machine() -> str:
    memory = memory_gib()
    text = f"{cpu_model()}, {os.cpu_count()} cores"
    if memory is not None:
        text += f", {memory:.0f} GiB memory"
    return f"{text}; {platform.system()} {platform.release()}, Python {platform.python_version()}"


PEER_VERSIONS_SCRIPT = """
import importlib.metadata, json, platform, sys
versions = {}
for name in sys.argv[1:] + ["torch", "torchvision", "numpy"]:
    try:
        versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        versions[name] = None
versions["python"] = platform.python_version()
print(json.dumps(versions))
"""


def peer_versions(peer_python: str, peers: Sequence[str], work_dir: Path) -> dict[str, str | None]:
    """Return the installed version of each peer and of torch in the peers' Python."""
    command = [peer_python, "-c", PEER_VERSIONS_SCRIPT, *peers]
    try:
        completed = subprocess.run(
            command, cwd=work_dir, env=environment_without_pythonpath(),
            capture_output=True, text=True, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SystemExit(f"error: --peer_python {peer_python} failed to run: {error}") from error
    if completed.returncode != 0:
        raise SystemExit(
            f"error: --peer_python {peer_python} failed to list versions: {completed.stderr.strip()}"
        )
    return json.loads(completed.stdout)


def local_versions() -> dict[str, str | None]:
    """Return the versions of this Python's packages, read without importing them.

    Importing torch here would raise this process's RSS, and on Linux the ``ru_maxrss`` of
    every helper process starts from that RSS.
    """
    versions = {}
    for name in ("torch", "torchvision", "numpy", "scipy", "scikit-image", "Pillow"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_repository() -> str:
    """Return the checked-out commit and whether the engine's files have uncommitted changes."""
    def git(*arguments: str) -> str:
        completed = subprocess.run(
            ["git", *arguments], cwd=REPOSITORY_ROOT, capture_output=True, text=True, check=True
        )
        return completed.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "engine", "cka", "data", "models")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    state = "with uncommitted changes in engine, cka, data or models" if changed else "no uncommitted engine changes"
    return f"commit {commit}, {state}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    keys = list(workloads(quick=False)) + [MEMORY_CHECK_KEY]
    parser.add_argument(
        "--workloads", nargs="+", choices=keys, default=keys,
        help=f"workloads to run, in this order; {MEMORY_CHECK_KEY} is the memory check (default: all)",
    )
    parser.add_argument(
        "--repetitions", type=int, default=None,
        help=f"counted rounds of every tool after the warm-up (default: {DEFAULT_REPETITIONS}; "
        "1 with --quick)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None,
        help=f"rounds run first and not counted (default: {DEFAULT_WARMUP}; 0 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="run small versions of the workloads, to check that every tool works; "
        "the numbers do not measure speed",
    )
    parser.add_argument(
        "--peer_python", default=sys.executable,
        help="Python interpreter that has the peer packages installed (default: this one)",
    )
    parser.add_argument(
        "--peers", nargs="+", choices=PEERS, default=list(PEERS),
        help="peer packages to run (default: all three)",
    )
    parser.add_argument(
        "--output", type=Path, default=None,
        help="Markdown results page (default: bench/RESULTS.md, or bench/runs/RESULTS-quick.md with --quick)",
    )
    parser.add_argument(
        "--work_dir", type=Path, default=None,
        help="folder for the image arrays, matrices and logs of every process "
        "(default: bench/runs/benchmark, or bench/runs/benchmark-quick with --quick)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S,
        help=f"seconds after which one helper process is stopped and its tool marked failed "
        f"(default: {DEFAULT_TIMEOUT_S:.0f})",
    )
    args = parser.parse_args(argv)

    if args.repetitions is None:
        args.repetitions = 1 if args.quick else DEFAULT_REPETITIONS
    if args.warmup is None:
        args.warmup = 0 if args.quick else DEFAULT_WARMUP
    if args.repetitions < 1:
        parser.error(f"--repetitions must be at least 1, got {args.repetitions}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")

    if args.output is None:
        args.output = BENCH_DIR / "runs" / "RESULTS-quick.md" if args.quick else BENCH_DIR / "RESULTS.md"
    if args.work_dir is None:
        args.work_dir = BENCH_DIR / "runs" / ("benchmark-quick" if args.quick else "benchmark")
    args.work_dir = args.work_dir.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", os.path.relpath(sys.argv[0]), *(sys.argv[1:] if argv is None else argv)])

    versions = peer_versions(args.peer_python, args.peers, args.work_dir)
    peers = {peer: versions[peer] for peer in args.peers}
    for peer, version in peers.items():
        if version is None:
            print(
                f"{peer} is not installed in {args.peer_python}; skipping it. "
                f"Install it with: {args.peer_python} -m pip install {peer}",
                flush=True,
            )
    settings = Settings(
        repetitions=args.repetitions,
        warmup=args.warmup,
        quick=args.quick,
        peer_python=args.peer_python,
        peers=peers,
        work_dir=args.work_dir,
        timeout_s=args.timeout,
    )
    page = report.Page(
        command=command,
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=describe_machine(),
        load_before=os.getloadavg(),
        versions=local_versions(),
        repository=describe_repository(),
        peer_python=args.peer_python,
        peer_versions=versions,
        peers=list(args.peers),
        repetitions=args.repetitions,
        warmup=args.warmup,
        quick=args.quick,
        work_dir=args.work_dir,
    )

    selected = workloads(args.quick)
    for key in args.workloads:
        if key in selected:
            page.workloads.append(run_workload(selected[key], settings))
        else:
            page.memory_check = run_memory_check(settings)
        page.load_after = os.getloadavg()
        page.benchmark_peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(page.render())
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
