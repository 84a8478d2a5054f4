#!/usr/bin/env python3
"""List the layers whose output an in-place op changes after the layer's forward hook fires.

An in-place ReLU after a BatchNorm, or a residual ``out += identity``, writes into the
tensor that the previous module returned. A forward hook that keeps that tensor and reads
it after the forward pass, as torch-cka 0.21 and pytorch-cka 1.1.3 do, then reads the
changed values. This script finds those layers by running the model once on a few images
and comparing every hooked output with a copy taken inside its hook.

Example:

    python bench/find_overwritten.py --layers layers.json --images images.npy --out overwritten.json

``--layers`` is a JSON object ``{model name: {label: [module names]}}``, and the output
has the same shape with only the overwritten names. Models are torchvision models built
with ``weights=None`` after ``torch.manual_seed(--seed)``.
"""

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from workloads import SEED

CHECK_IMAGES = 4


def find_overwritten_layers(model: nn.Module, names: Sequence[str], images: torch.Tensor) -> list[str]:
    """Return the named layers whose output tensor changes after their hook fires, in order."""
    modules = dict(model.named_modules())
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def store(name, module, inputs, output):
        stored[name] = (output, output.detach().clone())

    handles = [modules[name].register_forward_hook(functools.partial(store, name)) for name in names]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return [name for name in names if not torch.equal(stored[name][0], stored[name][1])]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=Path, required=True,
        help="JSON object {model name: {label: [module names]}}",
    )
    parser.add_argument(
        "--images", type=Path, required=True,
        help=f".npy file of preprocessed float32 images; the first {CHECK_IMAGES} are used",
    )
    parser.add_argument(
        "--seed", type=int, default=SEED,
        help=f"torch.manual_seed value set before each model is built (default: {SEED})",
    )
    parser.add_argument("--out", type=Path, required=True, help="output JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with args.layers.open() as file:
        requested = json.load(file)
    images = torch.from_numpy(np.load(args.images)[:CHECK_IMAGES])

    overwritten = {}
    for model_name, layer_lists in requested.items():
        torch.manual_seed(args.seed)
        model = torchvision.models.get_model(model_name, weights=None).eval()
        overwritten[model_name] = {
            label: find_overwritten_layers(model, names, images) for label, names in layer_lists.items()
        }
    args.out.write_text(json.dumps(overwritten, indent=1))
    print(f"overwritten layers saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
