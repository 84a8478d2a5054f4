"""Kernel (Gram) matrices of layer representations.

A representation is a tensor whose first dimension indexes examples; it is flattened to
``(n, features)``. ``shift_features`` and ``linear_gram`` upcast float16 and bfloat16 to
float32 before any arithmetic, because half-precision products overflow and their sums
lose digits.
"""

import functools

import numpy as np
import torch

__all__ = [
    "shift_features",
    "linear_gram",
    "channel_grams",
    "accurate_gram",
    "rbf_from_gram",
    "squared_distances",
]


def shift_features(features: torch.Tensor, reference: int | torch.Tensor = 0) -> torch.Tensor:
    """Flatten a batch of representations and subtract one of its examples from every row.

    CKA double-centers kernels, and both HSIC estimators ignore a common shift of the
    examples, so any reference point will do. Subtracting an example is exact for a
    feature that is constant over the batch, which makes a constant layer exactly zero.
    An example near the batch's center keeps the most digits in a float32 product.

    Args:
        features: ``(n, ...)`` representations of ``n`` examples; half precision is
            upcast to float32.
        reference: index of the example to subtract, an int or a one-element tensor.

    Returns:
        ``(n, p)`` shifted features in float32, or float64 for float64 input.
    """
    flat = _flatten(features)
    index = torch.as_tensor(reference, device=flat.device).reshape(1)
    return flat - flat.index_select(0, index)


def _central_example(gram: torch.Tensor) -> torch.Tensor:
    """Return, as a one-element tensor, the example closest to the batch mean."""
    gram = gram.to(torch.float64)
    distances_to_mean = torch.diagonal(gram) - 2.0 * gram.mean(dim=1) + gram.mean()
    return torch.argmin(distances_to_mean).reshape(1)


def _flatten(features: torch.Tensor) -> torch.Tensor:
    features = _in_memory_order(features.detach())
    return _full_precision(features.reshape(features.shape[0], -1))


def _full_precision(features: torch.Tensor) -> torch.Tensor:
    return features if features.dtype in (torch.float32, torch.float64) else features.float()


def _in_memory_order(features: torch.Tensor) -> torch.Tensor:
    """Permute the feature dimensions into their order in memory, where that makes a view.

    A Gram matrix sums over features, so their order does not matter, and flattening a
    channels-last output in this order needs no copy. Examples stay the first dimension.
    """
    if features.is_contiguous() or features.dim() < 3:
        return features
    order = sorted(range(1, features.dim()), key=features.stride, reverse=True)
    permuted = features.permute(0, *order)
    return permuted if permuted.is_contiguous() else features


# Limits on a Gram matrix, beyond which its product is computed again from shifted
# features. The float32 error of an entry is about eps |x_i| |x_j|. Relative to the
# centered kernel it grows as trace / centered trace, at most 8 eps here. Relative to
# the median squared distance, it grows as |x_i|^2 over that median, at most 32 eps here.
_MIN_CENTERED_SHARE = 0.125
_MAX_NORM_TO_MEDIAN_DISTANCE = 16.0


@functools.lru_cache(maxsize=16)
def _upper_triangle(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def _imprecise(gram: torch.Tensor, for_distances: bool) -> bool:
    """Tell whether a CPU Gram matrix lost too many digits to its features' common offset.

    NumPy does the few operations on the small matrix with much less per-call overhead
    than torch, which matters at one call per layer and batch.
    """
    matrix = gram.numpy().astype(np.float64)
    norms = np.diagonal(matrix)
    total = norms.sum()
    centered = total - matrix.sum() / matrix.shape[0]
    if not centered >= _MIN_CENTERED_SHARE * total:
        return True
    if not for_distances or matrix.shape[0] < 2:
        # One example has no distances to keep accurate.
        return False
    distances = (norms[:, None] + norms[None, :] - 2.0 * matrix)[_upper_triangle(matrix.shape[0])]
    # The lower median is enough for a bound, and partition avoids a full sort.
    middle = (distances.size - 1) // 2
    median = np.partition(distances, middle)[middle]
    return not norms.max() <= _MAX_NORM_TO_MEDIAN_DISTANCE * median


# Size of a batch's features, as float32 or float64, from which a product runs on them
# without subtracting an example first. The subtraction is a pass over memory that costs
# a third of the product or more. Without it, a product with a large common offset loses
# digits and runs a second time, but below this size both cost little. No product of the
# benchmark's random-init ResNets at 64 pixels (64 examples) ran a second time.
_PLAIN_PRODUCT_BYTES = 256 << 10


def _shifts_first(flat: torch.Tensor) -> bool:
    return flat.numel() * flat.element_size() < _PLAIN_PRODUCT_BYTES


def linear_gram(features: torch.Tensor, for_distances: bool = False) -> torch.Tensor:
    """Compute the linear kernel ``K = X X^T`` of a batch, accurate after centering.

    CKA double-centers kernels, so any common shift of the examples leaves it
    unchanged, but a large common offset costs a float32 product its digits. Features
    under 256 KiB (as float32) are shifted by their first example before the product
    (``shift_features``), which is exact for a constant layer and usually leaves an
    offset no larger than the spread of the examples. Larger ones are multiplied as they
    are. ``accurate_gram`` then checks the product and computes it again from shifted
    features when needed. On GPUs, where that check would wait for the device at every
    layer, the product always runs after subtracting the example closest to the mean.

    Args:
        features: ``(n, ...)`` representations of ``n`` examples; half precision is
            upcast to float32.
        for_distances: the matrix will give distances between examples (RBF kernels).

    Returns:
        ``(n, n)`` Gram matrix of the features after a common shift, float32 for float32
        and half-precision input.
    """
    flat = _flatten(features)
    if flat.device.type != "cpu":
        # NOTE: the GPU branches of this module have not been run on a GPU.
        return _shifted_product(flat, _central_example(_shifted_product(flat, 0)))
    gram = _shifted_product(flat, 0) if _shifts_first(flat) else flat @ flat.T
    return accurate_gram(gram, flat, for_distances)


def accurate_gram(gram: torch.Tensor, features: torch.Tensor, for_distances: bool = False) -> torch.Tensor:
    """Return ``gram`` if float32 kept it accurate, or compute a better one.

    ``gram`` is too coarse when its centered part is less than an eighth of its trace
    or, with ``for_distances``, when an example's squared norm exceeds 16 times the
    median squared distance. A product of unshifted features then runs again on
    ``shift_features``. If the features shifted by their first example are still too
    coarse, the product runs after subtracting the example closest to the batch mean,
    which keeps at least half of the trace centered.

    Args:
        gram: ``(n, n)`` Gram matrix of ``features`` computed as ``linear_gram`` and
            ``channel_grams`` do: after subtracting the first example from features
            under 256 KiB, of the features as they are (or with any common shift) above.
        features: ``(n, ...)`` representations the matrix was computed from.
        for_distances: the matrix will give distances between examples (RBF kernels).

    Returns:
        ``gram`` itself, or the ``(n, n)`` matrix computed again.
    """
    if gram.device.type != "cpu":
        return _shifted_product(features, _central_example(gram))
    if not _imprecise(gram, for_distances):
        return gram
    flat = _flatten(features)
    if not _shifts_first(flat):
        gram = _shifted_product(flat, 0)
        if not _imprecise(gram, for_distances):
            return gram
    return _shifted_product(flat, _central_example(gram))


# Bytes of shifted features that one step of a product copies on the CPU. Shifting a
# large output at once allocates a whole copy, and when that is fresh memory the copy
# takes longer than the product. Steps this small stay in the processor's cache.
_CHUNK_BYTES = 4 << 20


def _shifted_product(features: torch.Tensor, reference: int | torch.Tensor) -> torch.Tensor:
    """Compute the Gram matrix of ``shift_features(features, reference)``.

    On the CPU, the columns are shifted and multiplied a few at a time, so the shifted
    copy is never made whole.
    """
    flat = _flatten(features)
    n, size = flat.shape
    columns = max(1, _CHUNK_BYTES // (n * flat.element_size()))
    if flat.device.type != "cpu" or size <= columns:
        shifted = shift_features(flat, reference)
        return shifted @ shifted.T

    origin = flat[int(reference)]
    gram = flat.new_zeros((n, n))
    buffer = flat.new_empty((n, columns))
    for start in range(0, size, columns):
        stop = min(size, start + columns)
        chunk = torch.sub(flat[:, start:stop], origin[start:stop], out=buffer[:, : stop - start])
        gram.addmm_(chunk, chunk.T)
    return gram


def channel_grams(features: torch.Tensor, for_distances: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute one Gram matrix per channel of a batch, and the batch's Gram matrix.

    The per-channel matrices add up to a Gram matrix of the batch after a common shift
    of its examples. Weighted by squared per-channel scales, they add up to one of the
    features with each channel scaled, as a BatchNorm in eval mode scales them before
    adding its shift. As in ``linear_gram``, features under 256 KiB (as float32) are
    shifted by their first example before the products, and larger ones are multiplied
    as they are. When the sum of the unshifted products lost digits, the products run
    again after the shift, so that the per-channel matrices are as accurate as the sum.
    On GPUs the products always run after the shift. On a 2-core Intel Xeon, the batched
    product over channels took 1.1 to 1.3 times as long as the single product. That was
    for the ResNet layer shapes of ``bench/`` whose channels hold at least 8 n values per
    example, for n examples.

    Args:
        features: ``(n, channels, ...)`` representations of ``n`` examples; half
            precision is upcast to float32.
        for_distances: the batch's matrix will give distances between examples.

    Returns:
        ``(channels, n, n)`` per-channel matrices in float64, and the batch's ``(n, n)``
        Gram matrix as ``accurate_gram`` returns it, float32 for float32 and
        half-precision input.
    """
    n, channels = features.shape[:2]
    # The reshape copies channels-last features into channels first.
    by_channel = _full_precision(features.detach().reshape(n, channels, -1))
    flat = by_channel.reshape(n, -1)
    # GPUs skip the check, and the example closest to the mean is found from this sum.
    shifted = _shifts_first(flat) or flat.device.type != "cpu"
    grams = _channel_products(by_channel, shifted)
    gram = grams.sum(dim=0).to(flat.dtype)
    if flat.device.type != "cpu":
        return grams, accurate_gram(gram, flat, for_distances)
    if not shifted and _imprecise(gram, for_distances):
        grams = _channel_products(by_channel, shifted=True)
        gram = grams.sum(dim=0).to(flat.dtype)
    if _imprecise(gram, for_distances):
        # The first example lies far from the others.
        gram = _shifted_product(flat, _central_example(gram))
    return grams, gram


def _channel_products(features: torch.Tensor, shifted: bool) -> torch.Tensor:
    """Compute the Gram matrix of each channel of ``(n, channels, positions)`` features.

    The products run in the features' precision and are returned in float64.
    With ``shifted``, the first example is subtracted a few channels at a time, as in
    ``_shifted_product``, so the shifted copy is never made whole.
    """
    n, channels, positions = features.shape
    if not shifted:
        return torch.bmm(features.transpose(0, 1), features.permute(1, 2, 0)).double()
    step = max(1, _CHUNK_BYTES // (n * positions * features.element_size()))
    grams = features.new_empty((channels, n, n))
    buffer = features.new_empty((n, min(step, channels), positions))
    for start in range(0, channels, step):
        stop = min(channels, start + step)
        chunk = torch.sub(features[:, start:stop], features[0, start:stop], out=buffer[:, : stop - start])
        torch.bmm(chunk.transpose(0, 1), chunk.permute(1, 2, 0), out=grams[start:stop])
    return grams.double()


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
    values = distances[..., rows, cols]
    count = values.shape[-1]
    # kthvalue selects without a full sort, and its k counts from 1.
    middle_high = torch.kthvalue(values, count // 2 + 1, dim=-1).values
    middle_low = torch.kthvalue(values, (count - 1) // 2 + 1, dim=-1).values
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
