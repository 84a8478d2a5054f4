#!/usr/bin/env python3
"""Time one run of the repository's engine on torchvision models and save its CKA matrices.

``bench/benchmark.py`` runs this script in a fresh process for every measurement. It runs
with the repository root as working directory and first on ``sys.path``, as the engine's
Python users do. It sets the allocator as the command line does for CPU runs
(``engine.keep_freed_memory``) and times ``engine.run_plan`` with the kernel cache off,
which runs models with convolutions channels last on the CPU.
The time reported as ours is ``timings["total_s"] - timings["build_s"]``: reading and resizing the
images, tracing each model, the forward passes and the CKA, without building the models.

Example, from anywhere:

    python bench/run_ours.py --models resnet18 resnet34 --depths -1 --kernel linear \\
        --image_size 64 --batch_size 64 --batch_count 8 --out ours.npz

The output .npz contains ``seconds``, ``total_seconds``, ``peak_rss_kib``,
``rss_kib_before`` (the RSS right before the timed part), ``comparisons`` (JSON list of
``[rows model, columns model, depth]``), for comparison ``i`` ``matrix_i``, ``rows_i`` and
``columns_i``, ``freed_memory_kept`` (whether the allocator setting applied), and with
``--check_images`` ``images_max_difference``.
"""

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from process_memory import Measurement
from workloads import DATASET, RBF_SIGMA, SEED

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", required=True,
        help="torchvision model names: the rows and columns model, or with --compare_all 1 any number",
    )
    parser.add_argument(
        "--compare_all", type=int, choices=(0, 1), default=0,
        help="1: compare every pair of --models, each with itself included (default: 0)",
    )
    parser.add_argument("--depths", nargs="+", type=int, required=True, help="layer depths, -1 for leaves")
    parser.add_argument("--kernel", required=True, choices=("linear", "rbf"), help="CKA kernel")
    parser.add_argument("--image_size", type=int, required=True, help="input side in pixels")
    parser.add_argument("--batch_size", type=int, required=True, help="images per batch")
    parser.add_argument("--batch_count", type=int, required=True, help="number of batches")
    parser.add_argument(
        "--check_images", type=Path, default=None,
        help="after the timed part, compare the engine's model inputs with this .npy file of "
        "bench/prepare_images.py and save the largest difference as images_max_difference",
    )
    parser.add_argument("--out", type=Path, required=True, help="output .npz file")
    args = parser.parse_args(argv)
    if not args.compare_all and (len(args.models) != 2 or len(args.depths) != 1):
        parser.error("without --compare_all 1, give exactly 2 --models and 1 --depths value")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    check_images = None if args.check_images is None else args.check_images.resolve()
    os.chdir(REPOSITORY_ROOT)
    sys.path.insert(0, str(REPOSITORY_ROOT))

    import numpy as np
    import torch

    import engine

    with tempfile.TemporaryDirectory(prefix="cka-bench-output-") as output_path:
        options = engine.RunOptions(
            models_names=list(args.models) if args.compare_all else [args.models[0]],
            compare_models_names=None if args.compare_all else [args.models[1]],
            compare_all=args.compare_all,
            torchvision=1,
            pretrained=[0],
            dataset=DATASET,
            batch_size=args.batch_size,
            dataloader_size=args.batch_count,
            input_shape=[args.image_size],
            CKA_type=["linear_CKA" if args.kernel == "linear" else "kernel_CKA"],
            rbf_sigma=RBF_SIGMA,
            hsic="unbiased",
            layers_depth=list(args.depths),
            remove_output_layer=0,
            device=-1,
            output_path=output_path,
            seed=SEED,
            cache=0,
        )
        plan = engine.build_plan(options)
        # As main_feat_maps.py does for CPU runs.
        freed_memory_kept = engine.keep_freed_memory()

        with Measurement() as measured:
            result = engine.run_plan(plan, progress=False, cache_dir=None)

    timings = result.timings
    arrays = {}
    if check_images is not None:
        from prepare_images import model_inputs

        inputs = model_inputs(args.models, args.image_size, args.batch_size * args.batch_count, args.batch_size)
        expected = np.load(check_images)
        same_shape = inputs.shape == expected.shape
        arrays["images_max_difference"] = np.abs(inputs.numpy() - expected).max() if same_shape else np.inf

    comparisons = []
    for index, pair in enumerate(result.pairs):
        comparisons.append([pair.task.model_x.name, pair.task.model_y.name, pair.task.depth])
        arrays[f"matrix_{index}"] = pair.matrix.numpy()
        arrays[f"rows_{index}"] = np.array(pair.rows)
        arrays[f"columns_{index}"] = np.array(pair.columns)

    seconds = timings["total_s"] - timings["build_s"]
    np.savez(
        out,
        seconds=seconds,
        total_seconds=timings["total_s"],
        build_seconds=timings["build_s"],
        wall_seconds=measured.seconds,
        timings=json.dumps(timings),
        **measured.memory(),
        comparisons=json.dumps(comparisons),
        freed_memory_kept=freed_memory_kept,
        torch_version=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
        **arrays,
    )
    print(
        f"ours: {len(result.pairs)} matrices in {seconds:.3f} s without model building "
        f"({timings['total_s']:.3f} s in all), peak RSS {measured.peak_rss_kib / 1024:.0f} MiB, saved to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
