#!/usr/bin/env python3
"""Time the bare forward passes of torchvision models over preprocessed images: the floor.

No CKA tool can take less time than running its models once over the images with the same
allocator setting and memory layout. ``bench/benchmark.py`` reports every tool's time as a
multiple of this one, measured with glibc's default settings in channels first, and as ours
runs: ``--keep_freed_memory 1 --channels_last 1``. Each model is
built with ``weights=None`` after ``torch.manual_seed(--seed)``, as the other tools build
it, and runs once over every batch under ``torch.inference_mode()``. Model building and
reading the images are not timed.

Example:

    python bench/run_floor.py --models resnet18 resnet34 --images images.npy \\
        --batch_size 64 --out floor.npz

The output .npz contains ``seconds``, ``peak_rss_kib``, ``rss_kib_before`` (the RSS right
before the timed part), ``model_bytes``, the size of the models' parameters and buffers,
``freed_memory_kept``, whether ``--keep_freed_memory 1`` set the allocator, and
``channels_last``.
"""

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from process_memory import Measurement
from seeded_models import build_models, state_bytes
from workloads import SEED


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="torchvision model names")
    parser.add_argument(
        "--images", type=Path, required=True, help=".npy file of preprocessed float32 images, shape (N, 3, S, S)"
    )
    parser.add_argument("--batch_size", type=int, required=True, help="images per batch")
    parser.add_argument(
        "--seed", type=int, default=SEED,
        help=f"torch.manual_seed value set before each model is built (default: {SEED})",
    )
    parser.add_argument(
        "--keep_freed_memory", type=int, choices=(0, 1), default=0,
        help="1: set the allocator as the command line does for CPU runs, with the engine's "
        "keep_freed_memory (default: 0)",
    )
    parser.add_argument(
        "--channels_last", type=int, choices=(0, 1), default=0,
        help="1: lay out the models and batches channels last, as the engine runs CPU models "
        "with convolutions (default: 0)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output .npz file")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be positive, got {args.batch_size}")
    return args


def keep_freed_memory() -> bool:
    """Call ``engine.keep_freed_memory`` without importing the engine's dependencies."""
    path = Path(__file__).resolve().parent.parent / "engine" / "allocator.py"
    spec = importlib.util.spec_from_file_location("engine_allocator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.keep_freed_memory()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    freed_memory_kept = keep_freed_memory() if args.keep_freed_memory else False
    images = torch.from_numpy(np.load(args.images))
    batches = list(torch.split(images, args.batch_size))
    models = build_models(args.models, args.seed)
    if args.channels_last:
        batches = [batch.contiguous(memory_format=torch.channels_last) for batch in batches]
        models = [model.to(memory_format=torch.channels_last) for model in models]
    model_bytes = state_bytes(models)

    with Measurement() as measured, torch.inference_mode():
        for model in models:
            for batch in batches:
                model(batch)

    np.savez(
        args.out,
        seconds=measured.seconds,
        **measured.memory(),
        model_bytes=model_bytes,
        freed_memory_kept=freed_memory_kept,
        channels_last=bool(args.channels_last),
        torch_version=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
    )
    print(
        f"floor: {len(models)} models over {len(batches)} batches in {measured.seconds:.3f} s, "
        f"peak RSS {measured.peak_rss_kib / 1024:.0f} MiB, saved to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
