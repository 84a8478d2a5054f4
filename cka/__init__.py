"""CKA estimators and accumulators.

Pure tensor code that does not depend on models or datasets. The engine turns each
layer's output into a Gram matrix with ``linear_gram``, packs the batch's kernels with
``pack_grams`` and sums every layer pair of a batch in ``MinibatchCKA``.
"""

from .accumulate import KERNELS, MinibatchCKA, kernels_from_grams, layer_kernels, minibatch_cka, pack_grams
from .estimators import MIN_EXAMPLES, center_kernels, hsic, hsic_vectors
from .kernels import accurate_gram, channel_grams, linear_gram, rbf_from_gram, shift_features, squared_distances

__all__ = [
    "KERNELS",
    "MIN_EXAMPLES",
    "MinibatchCKA",
    "accurate_gram",
    "center_kernels",
    "channel_grams",
    "hsic",
    "hsic_vectors",
    "kernels_from_grams",
    "layer_kernels",
    "linear_gram",
    "minibatch_cka",
    "pack_grams",
    "rbf_from_gram",
    "shift_features",
    "squared_distances",
]
