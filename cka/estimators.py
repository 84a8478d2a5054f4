"""HSIC estimators written as inner products of centered kernels.

Both estimators of HSIC are bilinear in the two kernels, so each one can be written as
``HSIC(K, L) = <C(K), C(L)>_F`` for a centering map ``C``:

- biased (Gretton et al. 2005): ``C(K) = H K H / (n - 1)`` with ``H = I - 11^T / n``;
- unbiased (Song et al. 2012, needs ``n >= 4``): with ``K~`` the kernel with a zeroed
  diagonal, ``r`` its row sums and ``s`` its total,
  ``a = r / (n - 2) - s / (2 (n - 1) (n - 2))`` and
  ``C(K) = (K~ - a 1^T - 1 a^T) / sqrt(n (n - 3))`` with the diagonal set to zero. Its
  rows sum to zero, which makes ``<C(K), C(L)>`` equal to Song et al.'s
  ``[tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))``.

``C(K)`` is symmetric, so ``hsic_vectors`` packs its diagonal and ``sqrt(2)`` times its
strict upper triangle into one vector. Dot products of such vectors are HSIC values, and
every layer pair of a batch is one matrix product. Self-HSIC is then a squared norm, never negative.
"""

import functools
import math

import torch

__all__ = [
    "MIN_EXAMPLES",
    "center_kernels",
    "hsic",
    "hsic_vectors",
]

MIN_EXAMPLES = {"biased": 2, "unbiased": 4}
"""Smallest batch each HSIC estimator is defined for."""


def _check_estimator(estimator: str, n: int) -> None:
    if estimator not in MIN_EXAMPLES:
        raise ValueError(f"expected estimator 'biased' or 'unbiased', got {estimator!r}")
    if n < MIN_EXAMPLES[estimator]:
        raise ValueError(
            f"the {estimator} HSIC estimator needs at least {MIN_EXAMPLES[estimator]} "
            f"examples per batch, got {n}"
        )


def center_kernels(kernels: torch.Tensor, estimator: str = "unbiased") -> torch.Tensor:
    """Apply the estimator's centering map ``C`` to a stack of kernel matrices.

    The kernels are symmetrised first, which removes the last-bit asymmetry that a
    float32 matrix product can leave.

    Args:
        kernels: ``(..., n, n)`` kernel matrices, ideally float64.
        estimator: ``"unbiased"`` (Song et al. 2012) or ``"biased"``.

    Returns:
        ``(..., n, n)`` centered kernels ``C(K)`` such that
        ``HSIC(K, L) = (C(K) * C(L)).sum()``.

    Raises:
        ValueError: for an unknown estimator or a batch too small for it.
    """
    n = kernels.shape[-1]
    _check_estimator(estimator, n)
    kernels = 0.5 * (kernels + kernels.transpose(-1, -2))
    # Both maps ignore a constant added to every entry. Removing one entry's value first
    # makes a kernel that is constant off the diagonal (a constant layer) centre to
    # exact zeros instead of rounding errors, which would give CKA 1 or 1e-16, not NaN.
    kernels = kernels - kernels[..., :1, 1:2]

    if estimator == "biased":
        centered = kernels - kernels.mean(dim=-1, keepdim=True)
        centered = centered - centered.mean(dim=-2, keepdim=True)
        return centered / (n - 1)

    off_diagonal = 1.0 - torch.eye(n, dtype=kernels.dtype, device=kernels.device)
    zeroed = kernels * off_diagonal
    row_sums = zeroed.sum(dim=-1)
    total = row_sums.sum(dim=-1, keepdim=True)
    offsets = row_sums / (n - 2) - total / (2.0 * (n - 1) * (n - 2))
    centered = zeroed - offsets.unsqueeze(-1) - offsets.unsqueeze(-2)
    return centered * off_diagonal / math.sqrt(n * (n - 3))


@functools.lru_cache(maxsize=32)
def _packing(n: int, with_diagonal: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    offset = 0 if with_diagonal else 1
    rows, cols = torch.triu_indices(n, n, offset=offset, device=device)
    weights = torch.full(rows.shape, math.sqrt(2.0), dtype=torch.float64, device=device)
    weights[rows == cols] = 1.0
    return rows, cols, weights


def hsic_vectors(kernels: torch.Tensor, estimator: str = "unbiased") -> torch.Tensor:
    """Center kernels and pack them so that dot products are HSIC values.

    Args:
        kernels: ``(..., n, n)`` kernel matrices of one batch of ``n`` examples.
        estimator: ``"unbiased"`` or ``"biased"``.

    Returns:
        ``(..., T)`` float64 vectors with ``T = n (n + 1) / 2`` for the biased estimator
        and ``n (n - 1) / 2`` for the unbiased one, whose diagonal is zero. For two
        vectors ``u`` and ``v`` of the same batch, ``u @ v`` is ``HSIC(K, L)``.
    """
    centered = center_kernels(kernels.to(torch.float64), estimator)
    rows, cols, weights = _packing(kernels.shape[-1], estimator == "biased", centered.device)
    return centered[..., rows, cols] * weights


def hsic(kernel_x: torch.Tensor, kernel_y: torch.Tensor, estimator: str = "unbiased") -> torch.Tensor:
    """Compute HSIC between two ``(n, n)`` kernel matrices, in float64.

    The unbiased estimate can be negative for independent representations.
    """
    if kernel_x.shape != kernel_y.shape:
        raise ValueError(f"kernel shapes differ: {tuple(kernel_x.shape)} and {tuple(kernel_y.shape)}")
    return hsic_vectors(kernel_x, estimator) @ hsic_vectors(kernel_y, estimator)
