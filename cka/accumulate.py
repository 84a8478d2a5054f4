"""Minibatch CKA (Nguyen, Raghu and Kornblith 2021) over every pair of layers at once.

``CKA = sum_b HSIC(K_b, L_b) / sqrt(sum_b HSIC(K_b, K_b) * sum_b HSIC(L_b, L_b))``. With
one batch and the biased estimator this is the CKA of Kornblith et al. (2019).
"""

from collections.abc import Iterable

import torch

from .estimators import hsic_vectors
from .kernels import linear_gram, rbf_from_gram

__all__ = ["KERNELS", "MinibatchCKA", "kernels_from_grams", "layer_kernels", "minibatch_cka", "pack_grams"]

KERNELS = ("linear", "rbf")


class MinibatchCKA:
    """Accumulate HSIC sums over batches for every (row layer, column layer) pair.

    The sums are float64 on the CPU. ``update`` takes the packed vectors of
    ``cka.hsic_vectors`` for one batch, and its cost is one matrix product whatever the
    number of layers. Sums from several accumulators (processes that saw different
    batches) add up to the sums of one accumulator that saw them all.

    Example:
        >>> accumulator = MinibatchCKA()
        >>> for vectors_x, vectors_y in batches:  # (layers_x, T) and (layers_y, T)
        ...     accumulator.update(vectors_x, vectors_y)
        >>> matrix = accumulator.compute()  # (layers_x, layers_y)

    Args:
        rows: number of row layers; with ``columns``, starts the sums at zero so that
            an accumulator given no batch can still be merged with others.
        columns: number of column layers.

    Attributes:
        cross: ``(rows, columns)`` sums of ``HSIC(K_b, L_b)``.
        self_x: ``(rows,)`` sums of ``HSIC(K_b, K_b)``.
        self_y: ``(columns,)`` sums of ``HSIC(L_b, L_b)``.
        batches: number of batches added.
    """

    def __init__(self, rows: int | None = None, columns: int | None = None) -> None:
        self.shape = None if rows is None or columns is None else (rows, columns)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.cross = self.self_x = self.self_y = None
        if self.shape is not None:
            rows, columns = self.shape
            self.cross = torch.zeros(rows, columns, dtype=torch.float64)
            self.self_x = torch.zeros(rows, dtype=torch.float64)
            self.self_y = torch.zeros(columns, dtype=torch.float64)
        self.batches = 0

    def update(self, vectors_x: torch.Tensor, vectors_y: torch.Tensor) -> None:
        """Add one batch.

        Args:
            vectors_x: ``(layers_x, T)`` packed centered kernels of the row layers.
            vectors_y: ``(layers_y, T)`` packed centered kernels of the column layers,
                from the same examples in the same order.
        """
        if vectors_x.shape[-1] != vectors_y.shape[-1]:
            raise ValueError(
                "row and column vectors come from different batch sizes: "
                f"{vectors_x.shape[-1]} and {vectors_y.shape[-1]} entries"
            )
        vectors_x = vectors_x.to(device="cpu", dtype=torch.float64)
        vectors_y = vectors_y.to(device="cpu", dtype=torch.float64)

        cross = vectors_x @ vectors_y.T
        self_x = (vectors_x * vectors_x).sum(dim=-1)
        self_y = (vectors_y * vectors_y).sum(dim=-1)
        if self.cross is None:
            self.cross, self.self_x, self.self_y = cross, self_x, self_y
        else:
            self.cross += cross
            self.self_x += self_x
            self.self_y += self_y
        self.batches += 1

    def compute(self) -> torch.Tensor:
        """Return the ``(layers_x, layers_y)`` float64 CKA matrix.

        A cell whose row or column layer has zero self-HSIC over all batches (a layer
        constant over the examples) is NaN, because CKA is undefined there.
        """
        if self.cross is None:
            raise RuntimeError("MinibatchCKA.compute() called before any update()")
        denominator = torch.sqrt(torch.outer(self.self_x, self.self_y))
        defined = denominator > 0
        safe = torch.where(defined, denominator, torch.ones_like(denominator))
        return torch.where(defined, self.cross / safe, torch.full_like(denominator, float("nan")))


def kernels_from_grams(grams: torch.Tensor, kernel: str = "linear", sigma: float = 1.0) -> torch.Tensor:
    """Turn linear Gram matrices into the requested kernels, in float64.

    Args:
        grams: ``(..., n, n)`` linear Gram matrices, as ``linear_gram`` returns.
        kernel: ``"linear"`` or ``"rbf"``.
        sigma: RBF bandwidth factor, relative to the median distance.
    """
    if kernel not in KERNELS:
        raise ValueError(f"expected kernel 'linear' or 'rbf', got {kernel!r}")
    grams = grams.to(torch.float64)
    return rbf_from_gram(grams, sigma) if kernel == "rbf" else grams


def pack_grams(
    grams: torch.Tensor, kernel: str = "linear", estimator: str = "unbiased", sigma: float = 1.0
) -> torch.Tensor:
    """Turn a batch's ``(layers, n, n)`` Gram matrices into ``MinibatchCKA.update`` input.

    Returns:
        ``(layers, T)`` float64 packed centered kernels (``hsic_vectors``).
    """
    return hsic_vectors(kernels_from_grams(grams, kernel, sigma), estimator)


def layer_kernels(features: torch.Tensor, kernel: str = "linear", sigma: float = 1.0) -> torch.Tensor:
    """Compute one layer's ``(n, n)`` float64 kernel matrix from its ``(n, ...)`` batch."""
    return kernels_from_grams(linear_gram(features, for_distances=kernel == "rbf"), kernel, sigma)


def minibatch_cka(
    batches_x: Iterable[torch.Tensor],
    batches_y: Iterable[torch.Tensor],
    kernel: str = "linear",
    estimator: str = "unbiased",
    sigma: float = 1.0,
) -> float:
    """Compute minibatch CKA between two representations of the same examples.

    Args:
        batches_x: ``(n_b, ...)`` representations of the first layer, one tensor per
            batch.
        batches_y: ``(n_b, ...)`` representations of the second layer for the same
            examples, in the same order.
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"unbiased"`` (needs ``n_b >= 4``) or ``"biased"``.
        sigma: RBF bandwidth factor.

    Returns:
        CKA as a Python float; NaN when either side is constant.
    """
    accumulator = MinibatchCKA()
    for features_x, features_y in zip(batches_x, batches_y, strict=True):
        if features_x.shape[0] != features_y.shape[0]:
            raise ValueError(
                f"batches differ in size: {features_x.shape[0]} and {features_y.shape[0]} examples"
            )
        vector_x = hsic_vectors(layer_kernels(features_x, kernel, sigma), estimator)
        vector_y = hsic_vectors(layer_kernels(features_y, kernel, sigma), estimator)
        accumulator.update(vector_x[None], vector_y[None])
    return float(accumulator.compute()[0, 0])
