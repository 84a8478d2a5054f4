#!/usr/bin/env python3
"""Compare every model of the zoo with itself by CKA and tabulate which ones work.

Each torchvision classification model and each pretrainedmodels model is built with
random weights (seed 0). The engine compares it with itself by linear CKA (unbiased
HSIC) at layer depths -1 (leaves) and 1, on 2 batches of 4 ``sample_photos`` images, on
the CPU. Both depths come from one forward pass per model. A self-comparison must have 1 on the
diagonal: a (model, depth) result is ok when every diagonal cell is within 1e-5 of 1.
A NaN diagonal cell is accepted only for a layer whose output is identical for every
image. The model is then rebuilt with the same seed to check this, and the result names
those layers.

torchvision models run at the smallest input size they accept from ``--sizes``;
pretrainedmodels models use the size of their settings (224, 299 or 331).

This script is not part of the test suite. Run it from the repository root:

    python bench/zoo_sweep.py --library all --output bench/ZOO.md
    python bench/zoo_sweep.py --library all --output bench/ZOO.md --resume
    python bench/zoo_sweep.py --library torchvision --models resnet18 vit_b_16

Every finished model appends one JSON line per depth to a results file next to
``--output`` (``bench/ZOO.jsonl`` for ``bench/ZOO.md``), and the Markdown is rewritten
from that file after every model, showing the latest line of each (library, model,
depth). ``--resume`` skips the models already in the results file. Without it, the
selected models run again and their new lines replace the old ones in the table. Delete
the results file to start over.

Models run one at a time in a worker process. A model that kills that process (for
example through the out-of-memory killer) or runs past ``--timeout`` is recorded as a
failure, and a new worker process takes the next model.
"""

import argparse
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

LIBRARY_CHOICES = ("torchvision", "pretrainedmodels")
DEPTHS = (-1, 1)
BATCH_SIZE = 4
BATCH_COUNT = 2
SEED = 0
TOLERANCE = 1e-5
DEFAULT_SIZES = (32, 64, 75, 96, 128, 224)
# NOTE: a guess, not measured. The largest models (vit_h_14, regnet_y_128gf) should need
# a few minutes on 2 CPU cores. Raise it on a slower or busier machine.
DEFAULT_TIMEOUT_S = 1800.0
WORKER_START_TIMEOUT_S = 300.0
MESSAGE_LIMIT = 300
LISTED_CELLS = 5

EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------
# Worker side: one model, both depths.
# ---------------------------------------------------------------------------------------


def one_line(error: BaseException) -> str:
    """Return ``Type: first line of the message``, cut to MESSAGE_LIMIT characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def is_size_rejection(error: BaseException, size: int) -> bool:
    """Return whether ``error`` means that the model cannot take a ``size`` pixel input.

    The engine raises ModelLoadError naming the size ("rejected a 32x32 input" when the
    traced forward pass fails, "cannot be built for a 32x32 input" when the constructor
    of a ViT or MaxViT raises). An engine that lets those constructor errors
    (AssertionError, ValueError) through ``models.build_model`` unchanged is handled too:
    an error raised inside ``build_model`` also counts.
    """
    from models import ModelLoadError

    if isinstance(error, ModelLoadError) and f"{size}x{size} input" in str(error):
        return True
    zoo_file = os.path.join("models", "zoo.py")
    frames = traceback.extract_tb(error.__traceback__)
    return any(frame.name == "build_model" and frame.filename.endswith(zoo_file) for frame in frames)


def run_self_comparison(library: str, name: str, size: int, depths: Sequence[int]):
    """Run the engine on ``name`` compared with itself and return its RunResult."""
    import engine

    with tempfile.TemporaryDirectory(prefix="zoo_sweep_") as output_path:
        options = engine.RunOptions(
            models_names=[name],
            torchvision=int(library == "torchvision"),
            pretrained=[0],
            dataset="sample_photos",
            batch_size=BATCH_SIZE,
            dataloader_size=BATCH_COUNT,
            # pretrainedmodels models take the size of their settings, and build_plan warns
            # about any other --input_shape than its default 224.
            input_shape=[size if library == "torchvision" else 224],
            layers_depth=list(depths),
            compare_all=1,
            CKA_type=["linear_CKA"],
            device=-1,
            output_path=output_path,
            seed=SEED,
        )
        return engine.run_plan(engine.build_plan(options), progress=False)


def inspect_layers(library: str, name: str, size: int, result, layers) -> dict[str, str]:
    """Rebuild the model, rerun the run's batches and describe each layer of ``layers``.

    Returns ``{layer name: description}``, where the description is ``"constant"`` when
    the layer's output is identical for every image of every batch.
    """
    import torch

    import data
    import models

    module = models.build_model(library, name, False, size, SEED)
    normalizer = result.models[0].normalizer
    names_by_call = {(layer.module_name, layer.call): layer.name for layer in layers}
    spread = {layer.name: 0.0 for layer in layers}
    non_finite = {layer.name: 0 for layer in layers}
    seen = {layer.name: 0 for layer in layers}
    calls: dict[str, int] = {}

    def make_hook(module_name: str):
        def hook(module, args, output):
            calls[module_name] = calls.get(module_name, 0) + 1
            layer_name = names_by_call.get((module_name, calls[module_name]))
            tensor = models.first_float_tensor(output)
            if layer_name is None or tensor is None:
                return
            flat = tensor.detach().reshape(tensor.shape[0], -1).float()
            seen[layer_name] += 1
            finite = torch.isfinite(flat)
            non_finite[layer_name] += int((~finite).sum())
            if bool(finite.all()):
                difference = float((flat - flat[:1]).abs().max())
                spread[layer_name] = max(spread[layer_name], difference)

        return hook

    named_modules = dict(module.named_modules())
    handles = [
        named_modules[module_name].register_forward_hook(make_hook(module_name))
        for module_name in dict.fromkeys(layer.module_name for layer in layers)
    ]
    try:
        with torch.inference_mode():
            for pixels in data.resized_batches(result.images, size, BATCH_SIZE):
                calls.clear()
                module(normalizer(pixels))
    finally:
        for handle in handles:
            handle.remove()

    descriptions = {}
    for layer in layers:
        if seen[layer.name] == 0:
            descriptions[layer.name] = "layer did not run when the model was rebuilt"
        elif non_finite[layer.name]:
            descriptions[layer.name] = f"output has {non_finite[layer.name]} non-finite (NaN or inf) values"
        elif spread[layer.name] == 0.0:
            descriptions[layer.name] = "constant"
        else:
            descriptions[layer.name] = f"output not constant: images differ by up to {spread[layer.name]:.3g}"
    return descriptions


def check_pair(pair, layer_states: dict[str, str]) -> dict:
    """Judge one self-comparison matrix: its diagonal must be 1, or NaN on constant layers."""
    import torch

    if pair.rows != pair.columns:
        return {
            "status": "failed",
            "result": f"row and column layers differ ({len(pair.rows)} and {len(pair.columns)} layers)",
            "constant_layers": [],
            "bad_cells": [],
        }

    diagonal = torch.diagonal(pair.matrix).tolist()
    constant_layers = []
    bad_cells = []
    for layer_name, value in zip(pair.rows, diagonal):
        if math.isnan(value):
            state = layer_states.get(layer_name, "not inspected")
            if state == "constant":
                constant_layers.append(layer_name)
            else:
                bad_cells.append({"layer": layer_name, "value": None, "problem": state})
        elif abs(value - 1.0) > TOLERANCE:
            bad_cells.append({"layer": layer_name, "value": value, "problem": f"off by {abs(value - 1.0):.2e}"})

    if bad_cells:
        listed = "; ".join(
            f"{cell['layer']} = {'NaN' if cell['value'] is None else format(cell['value'], '.6g')} "
            f"({cell['problem']})"
            for cell in bad_cells[:LISTED_CELLS]
        )
        if len(bad_cells) > LISTED_CELLS:
            listed += f"; and {len(bad_cells) - LISTED_CELLS} more"
        text = f"diagonal wrong at {len(bad_cells)} of {len(diagonal)} layers: {listed}"
        return {"status": "failed", "result": text, "constant_layers": constant_layers, "bad_cells": bad_cells}

    text = "ok"
    if constant_layers:
        noun = "layer" if len(constant_layers) == 1 else "layers"
        text = f"ok; NaN on {len(constant_layers)} constant {noun}: {', '.join(constant_layers)}"
    return {"status": "ok", "result": text, "constant_layers": constant_layers, "bad_cells": []}


def depth_failure(depth: int, message: str, size: int | None) -> dict:
    return {"depth": depth, "input_size": size, "layers": None, "status": "failed", "result": message,
            "constant_layers": [], "bad_cells": []}


def judge_result(library: str, name: str, size: int, result) -> list[dict]:
    """Return one judged entry per pair of ``result``, inspecting layers with a NaN diagonal."""
    import torch

    nan_layers = {}
    for pair in result.pairs:
        selection = result.models[0].selections[(pair.task.depth, False)]
        for index in torch.nonzero(torch.isnan(torch.diagonal(pair.matrix))).flatten().tolist():
            layer = selection.layers[index]
            nan_layers[(layer.module_name, layer.call)] = layer

    layer_states = {}
    if nan_layers:
        print(f"    {name}: NaN on the diagonal; rebuilding it to check {len(nan_layers)} layers", flush=True)
        try:
            layer_states = inspect_layers(library, name, size, result, list(nan_layers.values()))
        except Exception as error:  # noqa: BLE001 - reported in the result, as any model error
            layer_states = {layer.name: f"not inspected: {one_line(error)}" for layer in nan_layers.values()}

    entries = []
    for pair in result.pairs:
        verdict = check_pair(pair, layer_states)
        entries.append({"depth": pair.task.depth, "input_size": size, "layers": len(pair.rows), **verdict})
    return entries


def sweep_model(library: str, name: str, sizes: Sequence[int]) -> dict:
    """Compare one model with itself at every depth of DEPTHS and judge the diagonals.

    Every exception of the engine or of the model is caught and reported in the returned
    entries, since the sweep records failures instead of stopping at them.
    """
    import engine
    import models

    start = time.perf_counter()
    candidates = list(sizes) if library == "torchvision" else [models.input_spec(library, name, 224).size]
    rejected = []
    result = None
    error = None
    for size in candidates:
        try:
            result = run_self_comparison(library, name, size, DEPTHS)
            break
        except Exception as caught:  # noqa: BLE001 - any model error is a sweep result
            error = caught
            if library == "torchvision" and is_size_rejection(caught, size):
                rejected.append({"size": size, "error": one_line(caught)})
                print(f"    {name}: {size} px rejected ({one_line(caught)})", flush=True)
                gc.collect()
                continue
            break

    if result is not None:
        entries = judge_result(library, name, size, result)
        run_seconds = result.timings["total_s"]
    elif isinstance(error, engine.UsageError):
        # One depth may select no layer, so each depth runs alone and the other still gets a result.
        entries, run_seconds = [], 0.0
        for depth in DEPTHS:
            try:
                single = run_self_comparison(library, name, size, [depth])
            except Exception as caught:  # noqa: BLE001 - any model error is a sweep result
                entries.append(depth_failure(depth, one_line(caught), size))
                continue
            entries.extend(judge_result(library, name, size, single))
            run_seconds += single.timings["total_s"]
    elif rejected and len(rejected) == len(candidates):
        tried = ", ".join(str(item["size"]) for item in rejected)
        message = f"rejected every input size tried ({tried} px); last error: {rejected[-1]['error']}"
        entries, run_seconds = [depth_failure(depth, message, None) for depth in DEPTHS], None
    else:
        entries, run_seconds = [depth_failure(depth, one_line(error), size) for depth in DEPTHS], None

    del result
    gc.collect()
    return {
        "sizes_rejected": rejected,
        "seconds": round(time.perf_counter() - start, 2),
        "run_seconds": None if run_seconds is None else round(run_seconds, 2),
        "depths": entries,
    }


def warm_up() -> None:
    """Pay the one-time costs of a process before the first timed model.

    The first run in a process imports scikit-image and the model libraries and reads the
    photographs: resnet18 took 2.1 s as the first model of a worker and 0.4 s later, on
    the 2-core machine this script was written on. A discarded run evens that out.
    """
    import models

    models.available_models("pretrainedmodels")
    run_self_comparison("torchvision", "resnet18", 32, DEPTHS)
    gc.collect()


def worker_main(connection) -> None:
    """Serve ``(library, name, sizes)`` requests until a None request or a closed pipe."""
    import logging

    # The parent handles Ctrl-C and stops this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="    %(levelname)s %(name)s: %(message)s")
    # Every model's run repeats the same engine warnings, such as the one about batches of
    # 4 images, so each distinct message is printed once per worker process.
    printed: set[str] = set()

    def first_time(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in printed:
            return False
        printed.add(message)
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(first_time)
    warm_up()
    connection.send(("ready", None))
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        library, name, sizes = request
        start = time.perf_counter()
        try:
            outcome = sweep_model(library, name, sizes)
        except Exception as error:  # noqa: BLE001 - a bug of this script, reported as the model's result
            traceback.print_exc()
            message = f"the sweep script failed: {one_line(error)}"
            outcome = {
                "sizes_rejected": [],
                "seconds": round(time.perf_counter() - start, 2),
                "run_seconds": None,
                "depths": [depth_failure(depth, message, None) for depth in DEPTHS],
            }
        connection.send(("result", outcome))


# ---------------------------------------------------------------------------------------
# Parent side: the worker process, the results file and the Markdown.
# ---------------------------------------------------------------------------------------


class WorkerFailure(Exception):
    """The worker process died or timed out before returning a model's result."""


class Worker:
    """A spawned process that runs ``sweep_model`` for one model at a time."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.process = None
        self.connection = None

    def start(self) -> None:
        parent_end, child_end = self.context.Pipe()
        self.process = self.context.Process(target=worker_main, args=(child_end,), daemon=True)
        self.process.start()
        child_end.close()
        self.connection = parent_end
        self._receive(WORKER_START_TIMEOUT_S, "start")

    def _receive(self, timeout: float, expected: str):
        if not self.connection.poll(timeout):
            self.stop(graceful=False)
            raise WorkerFailure(
                f"timed out: no {expected} from the worker process after {timeout:g} s, so it was stopped"
            )
        try:
            return self.connection.recv()[1]
        except EOFError:
            self.process.join(timeout=10)
            code = self.process.exitcode
            self.stop(graceful=False)
            raise WorkerFailure(describe_exit(code)) from None

    def sweep(self, library: str, name: str, sizes: Sequence[int], timeout: float) -> dict:
        if self.process is None or not self.process.is_alive():
            self.start()
        self.connection.send((library, name, list(sizes)))
        return self._receive(timeout, "result")

    def stop(self, graceful: bool = True) -> None:
        """End the worker: ask an idle one to exit, or terminate one that is busy."""
        if self.process is None:
            return
        if graceful and self.process.is_alive():
            try:
                self.connection.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()
        self.process = None
        self.connection = None


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        signal_name = signal.Signals(-code).name
        hint = ", which the out-of-memory killer sends" if -code == signal.SIGKILL else ""
        return f"the worker process was killed by {signal_name}{hint}"
    return f"the worker process exited with status {code} without a result"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def describe_invocation(argv: Sequence[str], sizes: Sequence[int]) -> dict:
    """Return the command, date, machine and library versions of this run of the script."""
    import pretrainedmodels
    import torch
    import torchvision

    memory = memory_gib()
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    if memory is not None:
        machine += f", {memory:.0f} GiB memory"
    machine += f"; {platform.system()} {platform.release()}, Python {platform.python_version()}"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", os.path.relpath(argv[0]), *argv[1:]]),
        "machine": machine,
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pretrainedmodels": pretrainedmodels.__version__,
        },
        "sizes": list(sizes),
    }


def load_records(path: Path) -> list[dict]:
    """Read the results file; a line cut short by an interrupted write is skipped with a warning."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                print(f"warning: skipping invalid line {number} of {path}: {error}", file=sys.stderr)
    return records


def append_records(path: Path, records: Sequence[dict]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def latest_records(records: Sequence[dict]) -> list[dict]:
    """Keep the last record of each (library, model, depth), sorted by library, model, depth."""
    latest = {}
    for record in records:
        latest[(record["library"], record["model"], record["depth"])] = record
    def order(key: tuple[str, str, int]) -> tuple:
        library, model, depth = key
        return (LIBRARY_CHOICES.index(library), model, DEPTHS.index(depth) if depth in DEPTHS else len(DEPTHS))

    return [latest[key] for key in sorted(latest, key=order)]


def markdown_cell(value) -> str:
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(records: Sequence[dict]) -> str:
    """Return the Markdown page: how the sweep ran, a summary line and the results table."""
    latest = latest_records(records)
    invocations = {}
    for record in latest:
        invocation = record["invocation"]
        invocations.setdefault((invocation["date"], invocation["command"]), invocation)
    ordered = [invocations[key] for key in sorted(invocations)]
    sizes = ordered[-1]["sizes"] if ordered else list(DEFAULT_SIZES)

    lines = [
        "# CKA self-comparison of every zoo model",
        "",
        "Written by `bench/zoo_sweep.py` from the results file next to this page. Each model is "
        f"built with random weights (seed {SEED}) and compared with itself by linear CKA "
        f"(unbiased HSIC) at layer depths {' and '.join(map(str, DEPTHS))}, on {BATCH_COUNT} "
        f"batches of {BATCH_SIZE} `sample_photos` images, on the CPU. A result is ok when every "
        f"diagonal cell is within {TOLERANCE:g} of 1. A NaN diagonal cell is accepted only for a "
        "layer whose output is identical for every image, and the result names those layers.",
        "",
        "torchvision models run at the smallest input size they accept among "
        f"{', '.join(map(str, sizes))} pixels; pretrainedmodels models at the size of their "
        "settings. Seconds are the wall time of the model for both depths together (one "
        "forward pass serves both), including the builds at rejected input sizes and any "
        "rebuild that checks constant layers.",
        "",
    ]
    if len(ordered) == 1:
        invocation = ordered[0]
        versions = ", ".join(f"{name} {version}" for name, version in invocation["versions"].items())
        lines += [
            f"- Command: `{invocation['command']}`",
            f"- Date: {invocation['date']}",
            f"- Machine: {invocation['machine']}",
            f"- Versions: {versions}",
            "",
        ]
    elif ordered:
        lines += [
            "The results come from several runs of the script:",
            "",
            "| date | command | machine | versions | results shown |",
            "| --- | --- | --- | --- | --- |",
        ]
        for invocation in ordered:
            versions = ", ".join(f"{name} {version}" for name, version in invocation["versions"].items())
            count = sum(1 for record in latest if record["invocation"]["date"] == invocation["date"])
            lines.append(
                f"| {invocation['date']} | `{markdown_cell(invocation['command'])}` | "
                f"{markdown_cell(invocation['machine'])} | {versions} | {count} |"
            )
        lines.append("")

    ok_count = sum(1 for record in latest if record["status"] == "ok")
    model_keys = {(record["library"], record["model"]) for record in latest}
    failed_models = {(record["library"], record["model"]) for record in latest if record["status"] != "ok"}
    with_constant = sum(1 for record in latest if record["status"] == "ok" and record["constant_layers"])
    lines += [
        f"**Summary: {ok_count} of {len(latest)} (model, depth) results ok; "
        f"{len(model_keys) - len(failed_models)} of {len(model_keys)} models ok at every depth; "
        f"{with_constant} ok results have constant layers.**",
        "",
        "| library | model | depth | input size | layers | seconds | result |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for record in latest:
        cells = [
            record["library"],
            record["model"],
            record["depth"],
            record["input_size"],
            record["layers"],
            None if record["seconds"] is None else f"{record['seconds']:.1f}",
            record["result"],
        ]
        lines.append("| " + " | ".join(markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, records: Sequence[dict]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(render_markdown(records), encoding="utf-8")
    os.replace(partial, path)


def model_records(library: str, name: str, outcome: dict, invocation: dict) -> list[dict]:
    return [
        {
            "library": library,
            "model": name,
            "seconds": outcome["seconds"],
            "run_seconds": outcome["run_seconds"],
            "sizes_rejected": outcome["sizes_rejected"],
            **entry,
            "invocation": invocation,
        }
        for entry in outcome["depths"]
    ]


def select_models(parser: argparse.ArgumentParser, library: str, names: Sequence[str] | None) -> list[tuple[str, str]]:
    """Return the (library, model) pairs to sweep; an unknown name is a usage error."""
    import difflib

    from models import available_models

    libraries = LIBRARY_CHOICES if library == "all" else (library,)
    catalog = {lib: available_models(lib) for lib in libraries}
    if not names:
        return [(lib, name) for lib in libraries for name in catalog[lib]]

    for name in names:
        if not any(name in catalog[lib] for lib in libraries):
            every_name = [known for lib in libraries for known in catalog[lib]]
            close = difflib.get_close_matches(name, list(dict.fromkeys(every_name)), n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            parser.error(f"--models: {name!r} is not a model of {' or '.join(libraries)}{hint}")
    chosen = dict.fromkeys(names)
    return [(lib, name) for lib in libraries for name in catalog[lib] if name in chosen]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Compare every torchvision and pretrainedmodels model with itself by CKA, with "
            "random weights, and write a Markdown table of which ones give a diagonal of 1."
        ),
    )
    parser.add_argument("--library", choices=[*LIBRARY_CHOICES, "all"], default="all",
                        help="model library to sweep (default: all)")
    parser.add_argument("--models", nargs="+", metavar="NAME", default=None,
                        help="model names to sweep (default: every model of --library)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "ZOO.md",
                        help="Markdown file to write (default: ZOO.md in this script's folder); the "
                             "results file is the same path with the suffix .jsonl")
    parser.add_argument("--resume", action="store_true",
                        help="skip the models that already have results in the results file")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), metavar="PIXELS",
                        help="input sizes in pixels tried for torchvision models, in increasing "
                             f"order (default: {' '.join(map(str, DEFAULT_SIZES))})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="time limit per model in seconds, after which the model is recorded "
                             f"as failed (default: {DEFAULT_TIMEOUT_S:.0f})")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if any(size < 1 for size in arguments.sizes):
        parser.error(f"--sizes must be positive numbers of pixels, got {arguments.sizes}")
    if not arguments.timeout > 0:
        parser.error(f"--timeout must be a positive number of seconds, got {arguments.timeout}")
    sizes = sorted(set(arguments.sizes))
    output = arguments.output
    if output.suffix == ".jsonl":
        parser.error(f"--output {output} must not end in .jsonl, the suffix of the results file")
    results_path = output.with_suffix(".jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)

    selected = select_models(parser, arguments.library, arguments.models)
    records = load_records(results_path)
    if arguments.resume:
        finished = {
            (library, name)
            for library, name in selected
            if {record["depth"] for record in records
                if record["library"] == library and record["model"] == name} >= set(DEPTHS)
        }
        todo = [key for key in selected if key not in finished]
        print(f"resuming: {len(finished)} of {len(selected)} models already in {results_path}", flush=True)
    else:
        todo = selected

    invocation = describe_invocation([sys.argv[0], *argv], sizes)
    noun = "model" if len(todo) == 1 else "models"
    print(f"sweeping {len(todo)} {noun}; results in {results_path}, table in {output}", flush=True)
    worker = Worker()
    sweep_start = time.perf_counter()
    try:
        for position, (library, name) in enumerate(todo, start=1):
            print(f"[{position}/{len(todo)}] {library} {name}", flush=True)
            model_start = time.perf_counter()
            try:
                outcome = worker.sweep(library, name, sizes, arguments.timeout)
            except WorkerFailure as failure:
                seconds = round(time.perf_counter() - model_start, 2)
                outcome = {
                    "sizes_rejected": [],
                    "seconds": seconds,
                    "run_seconds": None,
                    "depths": [depth_failure(depth, str(failure), None) for depth in DEPTHS],
                }
            new_records = model_records(library, name, outcome, invocation)
            append_records(results_path, new_records)
            records.extend(new_records)
            write_markdown(output, records)

            parts = [f"depth {entry['depth']}: {entry['result']}"
                     + ("" if entry["layers"] is None else f" ({entry['layers']} layer{'s' * (entry['layers'] != 1)})")
                     for entry in outcome["depths"]]
            size = outcome["depths"][0]["input_size"]
            size_text = "no input size" if size is None else f"{size} px"
            print(f"[{position}/{len(todo)}] {library} {name}: {size_text}, {outcome['seconds']:.1f} s; "
                  + "; ".join(parts), flush=True)
    except KeyboardInterrupt:
        worker.stop(graceful=False)
        write_markdown(output, records)
        print(f"interrupted; finished models are in {results_path}; rerun with --resume to continue",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    worker.stop()
    write_markdown(output, records)

    latest = latest_records(records)
    ok_count = sum(1 for record in latest if record["status"] == "ok")
    print(f"done in {time.perf_counter() - sweep_start:.0f} s: {ok_count} of {len(latest)} results ok; "
          f"wrote {output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
