#!/usr/bin/env python3
"""Save the images a workload feeds its models as one float32 array, with the engine's code.

The floor, the peers and the reference read this array, so that they get the same input
tensors as our engine. The script calls the engine's own functions: ``data.open_images``
for the ``sample_photos`` images, ``data.resized_batches`` to resize them and
``data.Normalizer`` with the models' mean and standard deviation from
``models.input_spec``. Every model of a workload must use the same normalisation, because
the peers take one array for both models.

Example:

    python bench/prepare_images.py --models resnet18 resnet34 --image_size 64 \\
        --image_count 512 --batch_size 64 --out images.npy
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from workloads import DATASET, SEED

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="torchvision model names")
    parser.add_argument("--image_size", type=int, required=True, help="input side in pixels")
    parser.add_argument("--image_count", type=int, required=True, help="number of images")
    parser.add_argument("--batch_size", type=int, required=True, help="images per batch, as in the run")
    parser.add_argument("--out", type=Path, required=True, help="output .npy file, float32 (N, 3, S, S)")
    return parser.parse_args(argv)


def model_inputs(models: Sequence[str], image_size: int, image_count: int, batch_size: int):
    """Return the ``(N, 3, S, S)`` float32 tensor that the engine feeds every model of ``models``.

    Raises:
        ValueError: when the models need different normalisations.
    """
    sys.path.insert(0, str(REPOSITORY_ROOT))
    import torch

    from data import Normalizer, open_images, resized_batches
    from models import input_spec

    specs = {input_spec("torchvision", name, image_size) for name in models}
    if len(specs) != 1:
        raise ValueError(
            f"the models {list(models)} need different preprocessing ({specs}), but the peers take "
            "one image array for both models; choose models with the same mean and std"
        )
    spec = specs.pop()
    normalizer = Normalizer(spec.mean, spec.std, spec.value_range, spec.color_space)
    images = open_images(DATASET, image_count, seed=SEED)
    return torch.cat([normalizer(pixels) for pixels in resized_batches(images, image_size, batch_size)])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    try:
        inputs = model_inputs(args.models, args.image_size, args.image_count, args.batch_size)
    except ValueError as error:
        sys.exit(f"error: {error}")
    np.save(args.out, inputs.numpy())
    print(f"{tuple(inputs.shape)} float32 images saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
