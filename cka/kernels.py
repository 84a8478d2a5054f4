"""Kernel (Gram) matrices of layer representations.

A representation is a tensor whose first dimension indexes examples; it is flattened to
``(n, features)``. Every function here accepts float16, bfloat16, float32 and float64
input. Half-precision input is upcast to float32 before any arithmetic, because its
products overflow and its sums lose digits.
"""

import torch

__all__ = [
    "shift_features",
    "linear_gram",
    "rbf_from_gram",
    "squared_distances",
]


def shift_features(features: torch.Tensor) -> torch.Tensor:
    """Flatten a batch of representations and subtract the first example from every row.

    CKA only sees kernels after they are double-centered, and both HSIC estimators
    are unchanged when every example moves by the same vector, so any reference point
    will do. Subtracting an example, unlike subtracting the mean, is exact for a feature
    that is constant over the batch, and usually exact for a large common offset
    (Sterbenz's lemma). So a constant layer becomes exactly zero, which makes its CKA
    NaN instead of a ratio of rounding errors, and float32 Gram products keep their
    digits when features have a large mean.

    Args:
        features: ``(n, ...)`` representations of ``n`` examples.

    Returns:
        ``(n, p)`` shifted features in float32, or float64 for float64 input.
    """
    flat = _flatten(features)
    return flat - flat[:1]


# Shift before the product when the batch mean carries more than 3/4 of the features'
# energy: the float32 rounding error of an unshifted product, relative to the centered
# kernel, grows as energy / centered energy, here at most 4 times float32's.
_MIN_CENTERED_SHARE = 0.25


def _flatten(features: torch.Tensor) -> torch.Tensor:
    flat = features.detach().reshape(features.shape[0], -1)
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def linear_gram(features: torch.Tensor) -> torch.Tensor:
    """Compute the linear kernel ``K = X X^T`` of a batch, accurate after centering.

    CKA double-centers kernels, so any common shift of the examples leaves it
    unchanged, but a large common offset costs a float32 product its digits. On the
    CPU the product runs on the features as they are, which saves a copy of the
    activation, and runs again on shifted features (``shift_features``) when the
    centered part of the kernel holds less than a quarter of its trace: a large mean,
    or a constant layer, which then comes out exactly zero. On GPUs the features are
    always shifted, because the check would wait for the device at every layer and the
    copy is cheap there.

    Args:
        features: ``(n, ...)`` representations of ``n`` examples.

    Returns:
        ``(n, n)`` Gram matrix, float32 for float32 and half-precision input.
    """
    flat = _flatten(features)
    if flat.device.type != "cpu":
        shifted = flat - flat[:1]
        return shifted @ shifted.T

    gram = flat @ flat.T
    total = torch.trace(gram).item()
    centered = total - gram.sum(dtype=torch.float64).item() / gram.shape[0]
    if centered >= _MIN_CENTERED_SHARE * total > 0:
        return gram
    shifted = flat - flat[:1]
    return shifted @ shifted.T


def squared_distances(grams: torch.Tensor) -> torch.Tensor:
    """Turn Gram matrices into squared Euclidean distances between examples.

    Args:
        grams: ``(..., n, n)`` linear Gram matrices.

    Returns:
        ``(..., n, n)`` matrices of ``d_ij^2``, clamped at zero and with an exactly zero
        diagonal.
    """
    norms = torch.diagonal(grams, dim1=-2, dim2=-1)
    distances = norms.unsqueeze(-1) + norms.unsqueeze(-2) - 2.0 * grams
    distances = distances.clamp_min(0.0)
    return distances * (1.0 - torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device))


def _median_off_diagonal(distances: torch.Tensor) -> torch.Tensor:
    """Return the median of ``d_ij^2`` over ``i < j`` for each matrix of a stack.

    The even-count median is the mean of the two middle values, as in ``numpy.median``.
    Each pair appears twice over ``i != j``, which gives the same median.
    """
    n = distances.shape[-1]
    rows, cols = torch.triu_indices(n, n, offset=1, device=distances.device)
    values, _ = torch.sort(distances[..., rows, cols], dim=-1)
    count = values.shape[-1]
    middle_high = values[..., count // 2]
    middle_low = values[..., (count - 1) // 2]
    return 0.5 * (middle_low + middle_high)


def rbf_from_gram(grams: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Compute RBF kernels from linear Gram matrices, with the median bandwidth rule.

    ``K_ij = exp(-d_ij^2 / (2 sigma^2 m))`` where ``m`` is the median of ``d_ij^2`` over
    ``i != j`` within the same batch (Kornblith et al. 2019). A kernel whose
    off-diagonal entries are all equal carries no information about the examples. That
    happens when ``m`` is zero (at least half of the pairs of examples coincide), and
    when ``sigma`` is so small or so large that every entry underflows to 0 or rounds
    to 1. Such a kernel is returned as all ones, so its centered kernel is zero and its
    CKA is NaN rather than a number made up by the bandwidth.

    Args:
        grams: ``(..., n, n)`` linear Gram matrices with ``n >= 2``.
        sigma: bandwidth factor, relative to the median distance.

    Returns:
        ``(..., n, n)`` RBF kernel matrices.
    """
    n = grams.shape[-1]
    if n < 2:
        raise ValueError(f"the RBF bandwidth needs at least 2 examples, got {n}")

    distances = squared_distances(grams)
    median = _median_off_diagonal(distances)
    scale = (2.0 * sigma**2) * median
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    kernels = torch.exp(-distances / safe_scale[..., None, None])

    rows, cols = torch.triu_indices(n, n, offset=1, device=grams.device)
    off_diagonal = kernels[..., rows, cols]
    informative = (scale > 0) & (off_diagonal.amax(dim=-1) > off_diagonal.amin(dim=-1))
    return torch.where(informative[..., None, None], kernels, torch.ones_like(kernels))
