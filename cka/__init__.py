"""CKA estimators and accumulators.

Pure tensor code that does not depend on models or datasets. The engine turns each
layer's output into a kernel with ``cka.kernels``, packs it with ``hsic_vectors`` and sums
every layer pair of a batch in ``MinibatchCKA``.
"""

from .accumulate import KERNELS, MinibatchCKA, layer_kernels, minibatch_cka
from .hsic import MIN_EXAMPLES, center_kernels, hsic, hsic_vectors
from .kernels import shift_features, linear_gram, rbf_from_gram, squared_distances

__all__ = [
    "KERNELS",
    "MIN_EXAMPLES",
    "MinibatchCKA",
    "shift_features",
    "center_kernels",
    "hsic",
    "hsic_vectors",
    "layer_kernels",
    "linear_gram",
    "minibatch_cka",
    "rbf_from_gram",
    "squared_distances",
]
