#!/usr/bin/env python3
"""Time the engine's Python API on one pair of torchvision models over an image array.

``bench/benchmark.py`` runs this script in a fresh process for every measurement. Unlike
``run_ours.py``, which times the command-line engine from image files to matrices, this
script starts where the peers start: models built before the timed part and the
preprocessed float32 images of ``bench/prepare_images.py``. The timed part is one call
of ``engine.compare_models``, so the difference from the peers is the CKA alone.

Example, from anywhere:

    python bench/run_api.py --models resnet18 resnet34 --depth -1 --kernel linear \\
        --images images.npy --batch_size 64 --out api.npz

The output .npz contains ``seconds``, ``peak_rss_kib``, ``rss_kib_before`` (the RSS
right before the timed part), ``model_bytes``, ``comparisons`` (JSON list with one
``[rows model, columns model, depth]``), ``matrix_0``, ``rows_0`` and ``columns_0``.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from process_memory import Measurement
from workloads import RBF_SIGMA, SEED

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs=2, required=True, help="torchvision names of the rows and columns model")
    parser.add_argument("--depth", type=int, required=True, help="layer depth, -1 for leaves")
    parser.add_argument("--kernel", required=True, choices=("linear", "rbf"), help="CKA kernel")
    parser.add_argument(
        "--images", type=Path, required=True, help=".npy file of preprocessed float32 images, shape (N, 3, S, S)"
    )
    parser.add_argument("--batch_size", type=int, required=True, help="images per batch")
    parser.add_argument("--out", type=Path, required=True, help="output .npz file")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be positive, got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPOSITORY_ROOT))

    import numpy as np
    import torch

    import engine
    from seeded_models import build_models, state_bytes

    images = torch.from_numpy(np.load(args.images))
    batches = list(torch.split(images, args.batch_size))
    models = build_models(args.models, SEED)
    model_bytes = state_bytes(models)

    with Measurement() as measured:
        comparison = engine.compare_models(
            models[0], models[1], batches, depth=args.depth, kernel=args.kernel, sigma=RBF_SIGMA
        )

    np.savez(
        args.out,
        seconds=measured.seconds,
        **measured.memory(),
        model_bytes=model_bytes,
        comparisons=json.dumps([[args.models[0], args.models[1], args.depth]]),
        matrix_0=comparison.matrix.numpy(),
        rows_0=np.array(comparison.rows),
        columns_0=np.array(comparison.columns),
        torch_version=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
    )
    print(f"api: one matrix in {measured.seconds:.3f} s, peak RSS {measured.peak_rss_kib / 1024:.0f} MiB, saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
