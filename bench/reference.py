#!/usr/bin/env python3
"""Compute a float64 numpy reference of minibatch CKA between two torchvision models.

This is the accuracy reference of ``bench/benchmark.py``. It shares no code with the
engine and follows the published formulas:

- linear kernel ``K = X X^T``;
- RBF kernel ``K_ij = exp(-d_ij^2 / (2 sigma^2 m))``, with ``d_ij^2`` computed directly
  by ``scipy.spatial.distance.pdist`` and ``m`` the median of ``d_ij^2`` over ``i != j``
  within the batch (Kornblith et al. 2019);
- unbiased HSIC of Song et al. (2012), with ``K~`` and ``L~`` the kernels with zeroed
  diagonals: ``[tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))``;
- minibatch CKA (Nguyen, Raghu and Kornblith 2021):
  ``sum_b HSIC(K_b, L_b) / sqrt(sum_b HSIC(K_b, K_b) * sum_b HSIC(L_b, L_b))``.

Each forward hook copies the layer's output to float64 and computes its kernel at once,
so in-place operations that run later in the forward pass (an in-place ReLU, a residual
``+=``) cannot change it. An RBF kernel whose median distance is zero carries no
information and becomes all ones, which gives a NaN CKA, as the engine does.

Example:

    python bench/reference.py --models resnet18 resnet34 --layers layers.json \\
        --images images.npy --batch_size 64 --kernel rbf --out reference.npz

The output .npz contains ``cka`` (rows are the first model's layers, columns the second's).
"""

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from scipy.spatial.distance import pdist, squareform
from torch import nn

from workloads import RBF_SIGMA, SEED


def linear_kernel(features: np.ndarray) -> np.ndarray:
    return features @ features.T


def rbf_kernel(features: np.ndarray, sigma: float) -> np.ndarray:
    """Return the RBF kernel with the median rule, or all ones when the median is zero."""
    distances = pdist(features, metric="sqeuclidean")
    # Each unordered pair appears twice among i != j, so the median over i < j is the same.
    median = np.median(distances)
    if median <= 0:
        return np.ones((len(features), len(features)))
    return squareform(np.exp(-distances / (2.0 * sigma**2 * median)), checks=False) + np.eye(len(features))


def unbiased_hsic_sums(kernels_x: np.ndarray, kernels_y: np.ndarray) -> np.ndarray:
    """Return the ``(layers_x, layers_y)`` unbiased HSIC of every pair of kernels of two stacks.

    The stacks have shape ``(layers, n, n)``. Each term of Song et al.'s formula is computed
    as written.
    """
    n = kernels_x.shape[-1]
    diagonal = np.arange(n)
    zeroed_x = kernels_x.copy()
    zeroed_x[:, diagonal, diagonal] = 0.0
    zeroed_y = kernels_y.copy()
    zeroed_y[:, diagonal, diagonal] = 0.0

    # tr(K~ L~) = sum_ij K~_ij L~_ji
    traces = zeroed_x.reshape(len(zeroed_x), -1) @ zeroed_y.transpose(0, 2, 1).reshape(len(zeroed_y), -1).T
    totals = np.outer(zeroed_x.sum(axis=(1, 2)), zeroed_y.sum(axis=(1, 2)))
    # 1^T K~ L~ 1 = (1^T K~) (L~ 1): column sums of K~ times row sums of L~
    products = zeroed_x.sum(axis=1) @ zeroed_y.sum(axis=2).T
    return (traces + totals / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * products) / (n * (n - 3))


class KernelHooks:
    """Forward hooks that turn each named layer's output into a float64 kernel at once."""

    def __init__(self, model: nn.Module, names: Sequence[str], kernel: str, sigma: float) -> None:
        modules = dict(model.named_modules())
        self.names = list(names)
        self.kernel = kernel
        self.sigma = sigma
        self.kernels: dict[str, np.ndarray] = {}
        for name in self.names:
            modules[name].register_forward_hook(functools.partial(self._store, name))

    def _store(self, name: str, module: nn.Module, inputs, output: torch.Tensor) -> None:
        # .to(float64) copies the float32 output before any later op can overwrite it.
        features = output.detach().flatten(1).to(torch.float64).numpy()
        if self.kernel == "linear":
            self.kernels[name] = linear_kernel(features)
        else:
            self.kernels[name] = rbf_kernel(features, self.sigma)

    def stack(self) -> np.ndarray:
        """Return this batch's kernels as a ``(layers, n, n)`` array in the order of the names."""
        return np.stack([self.kernels.pop(name) for name in self.names])


def build_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None).eval()


def reference_cka(
    model_x: nn.Module,
    model_y: nn.Module,
    layers_x: Sequence[str],
    layers_y: Sequence[str],
    images: torch.Tensor,
    batch_size: int,
    kernel: str,
    sigma: float,
) -> np.ndarray:
    """Return the ``(layers_x, layers_y)`` minibatch CKA matrix, in float64."""
    hooks_x = KernelHooks(model_x, layers_x, kernel, sigma)
    hooks_y = KernelHooks(model_y, layers_y, kernel, sigma)
    cross = np.zeros((len(layers_x), len(layers_y)))
    self_x = np.zeros(len(layers_x))
    self_y = np.zeros(len(layers_y))
    with torch.no_grad():
        for batch in torch.split(images, batch_size):
            model_x(batch)
            model_y(batch)
            kernels_x = hooks_x.stack()
            kernels_y = hooks_y.stack()
            cross += unbiased_hsic_sums(kernels_x, kernels_y)
            self_x += np.diagonal(unbiased_hsic_sums(kernels_x, kernels_x))
            self_y += np.diagonal(unbiased_hsic_sums(kernels_y, kernels_y))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cross / np.sqrt(np.outer(self_x, self_y))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs=2, required=True, metavar=("MODEL_X", "MODEL_Y"),
        help="two torchvision model names, built with weights=None",
    )
    parser.add_argument(
        "--layers", type=Path, required=True,
        help="JSON file with two lists of module names, one list per model",
    )
    parser.add_argument(
        "--images", type=Path, required=True, help=".npy file of preprocessed float32 images, shape (N, 3, S, S)"
    )
    parser.add_argument("--batch_size", type=int, required=True, help="images per batch, 4 or more")
    parser.add_argument("--kernel", required=True, choices=("linear", "rbf"), help="CKA kernel")
    parser.add_argument(
        "--sigma", type=float, default=RBF_SIGMA,
        help=f"RBF bandwidth as a multiple of the median distance (default: {RBF_SIGMA:g})",
    )
    parser.add_argument(
        "--seed", type=int, default=SEED,
        help=f"torch.manual_seed value set before each model is built (default: {SEED})",
    )
    parser.add_argument("--out", type=Path, required=True, help="output .npz file")
    args = parser.parse_args(argv)
    if args.batch_size < 4:
        parser.error(f"unbiased HSIC needs --batch_size 4 or more, got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with args.layers.open() as file:
        layers_x, layers_y = json.load(file)
    images = torch.from_numpy(np.load(args.images))
    if len(images) % args.batch_size:
        sys.exit(f"error: {len(images)} images do not split into batches of {args.batch_size}")
    model_x = build_model(args.models[0], args.seed)
    model_y = build_model(args.models[1], args.seed)

    start = time.perf_counter()
    matrix = reference_cka(model_x, model_y, layers_x, layers_y, images, args.batch_size, args.kernel, args.sigma)
    seconds = time.perf_counter() - start
    np.savez(args.out, cka=matrix, seconds=seconds, kernel=args.kernel, sigma=args.sigma)
    print(f"reference: {matrix.shape[0]}x{matrix.shape[1]} CKA matrix in {seconds:.1f} s, saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
