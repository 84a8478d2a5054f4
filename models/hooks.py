"""Forward hooks that turn layer outputs into Gram matrices while the model runs."""

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from cka.kernels import accurate_gram, channel_grams, linear_gram

from .errors import ModelLoadError
from .layers import LayerInfo, first_float_tensor, restore_training_state, training_state

__all__ = ["KernelRecorder"]


class KernelRecorder:
    """Record the Gram matrix of every selected layer during forward passes.

    Each hook computes its layer's ``(n, n)`` Gram matrix from the output as soon as the
    module returns. The activation is never kept: this bounds memory by the kernels,
    and an in-place operation that runs later (a ``ReLU(inplace=True)`` after a
    BatchNorm) cannot change what was recorded.

    On the CPU, a layer recorded right before a BatchNorm gets its Gram matrix from
    per-channel products (``channel_grams``) when each channel holds at least 8 n values
    per example, for a batch of n examples. Only contiguous, channels-first outputs
    qualify, so models that run channels last never take this path. When the BatchNorm,
    in eval mode, takes that very output next, unchanged, its Gram matrix is the
    per-channel matrices weighted by its squared scales. Its own product is then skipped
    unless that matrix fails the precision check of ``accurate_gram``, so a convolution
    and its BatchNorm usually cost one product instead of two. This needs a plain BatchNorm with no other
    forward hook, and an output whose mean is small enough next to its spread that
    float32 rounding of the real output does not matter.

    Use it as a context manager. Entering registers one hook per distinct module and
    puts the model in eval mode. Leaving removes every hook and restores every module's
    training flag, also after an exception. Nothing is added to the model's modules.

    Args:
        model: the model to run.
        layers: layers to record, in the order the returned stack should follow.
        for_distances: the matrices will give distances between examples (RBF
            kernels), which ``linear_gram`` checks for.

    Example:
        >>> with KernelRecorder(model, layers) as recorder:
        ...     grams = recorder.grams(images)  # (len(layers), n, n)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerInfo],
        for_distances: bool = False,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.for_distances = for_distances
        self._index = {(layer.module_name, layer.call): i for i, layer in enumerate(self.layers)}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[str, int] = {}
        self._grams: list[torch.Tensor | None] = []
        self._channels: _ChannelGrams | None = None
        self._before_norm: set[int] = set()
        self._training_state = training_state(model)
        self._active = False

    def __enter__(self) -> "KernelRecorder":
        modules = dict(self.model.named_modules())
        try:
            for module_name in dict.fromkeys(layer.module_name for layer in self.layers):
                hook = self._make_hook(module_name)
                self._handles.append(modules[module_name].register_forward_hook(hook))
        except BaseException:
            self._remove_hooks()
            raise
        self._before_norm = {
            index
            for index, layer in enumerate(self.layers[1:])
            if type(modules[layer.module_name]) in _BATCHNORMS
        }
        self._training_state = training_state(self.model)
        self.model.eval()
        self._active = True
        return self

    def __exit__(self, *exc_info) -> None:
        self._active = False
        self._remove_hooks()
        restore_training_state(self._training_state)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, module_name: str):
        def hook(module, args, output):
            call = self._calls.get(module_name, 0) + 1
            self._calls[module_name] = call
            index = self._index.get((module_name, call))
            if index is not None:
                self._grams[index] = self._gram(index, module, args, first_float_tensor(output))

        return hook

    def _gram(self, index: int, module: nn.Module, args: tuple, features: torch.Tensor) -> torch.Tensor:
        if features.device.type != "cpu":
            return linear_gram(features, self.for_distances)
        channels, self._channels = self._channels, None
        affine = _batchnorm_affine(module) if channels is not None else None
        derived = None
        if affine is not None and args and channels.came_from(args[0]):
            derived = channels.scaled_gram(*affine)
        if derived is not None:
            return accurate_gram(derived, features, self.for_distances)
        if index in self._before_norm and _splits_into_channels(features):
            # The next recorded layer is a BatchNorm, which may take this output.
            grams, gram = channel_grams(features, self.for_distances)
            self._channels = _ChannelGrams(features, grams)
            return gram
        return linear_gram(features, self.for_distances)

    def grams(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run one forward pass and return the Gram matrices of the recorded layers.

        Args:
            inputs: ``(n, ...)`` batch on the model's device.

        Returns:
            ``(layers, n, n)`` Gram matrices in the order of ``layers``, float32 for
            float32 and half-precision models.

        Raises:
            ModelLoadError: when a layer did not run in this batch, which happens when the
                model's control flow depends on its input.
        """
        if not self._active:
            raise RuntimeError("KernelRecorder.grams() must be called inside a 'with' block")
        self._calls = {}
        self._grams = [None] * len(self.layers)
        try:
            with torch.inference_mode():
                self.model(inputs)
        finally:
            self._channels = None

        missing = [layer.name for layer, gram in zip(self.layers, self._grams) if gram is None]
        if missing:
            raise ModelLoadError(
                f"layers traced earlier did not run for this batch: {', '.join(missing[:5])}; "
                "their model's control flow depends on the input, which CKA over batches "
                "cannot handle"
            )
        grams = torch.stack(self._grams) if self._grams else inputs.new_zeros((0, len(inputs), len(inputs)))
        self._grams = []
        return grams


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _splits_into_channels(features: torch.Tensor) -> bool:
    """Tell whether ``channel_grams`` is about as fast as one product for these features.

    The batch has n examples. On a 2-core Intel Xeon, per-channel products of channels
    with fewer than 8 n values per example cost the recorder more than the two products
    they replace, on the W1 and W4 workloads of ``bench/``.
    """
    if features.dim() < 3 or features.shape[1] < 8 or not features.is_contiguous():
        # A channels-last or strided output would be copied into channels first. By an
        # estimate from memory and compute speeds, the copy costs about the product saved.
        return False
    return features[0, 0].numel() >= max(8 * features.shape[0], 16)


def _batchnorm_affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return the per-channel ``(scale, shift)`` of a BatchNorm in eval mode, in float64.

    Such a BatchNorm maps channel ``c`` to ``scale_c * x + shift_c``. Only the plain
    torch classes qualify, with no forward method set on the instance and no forward
    hook but the recorder's, because a subclass, a replaced ``forward`` or a hook may
    change the output. None for anything else, including a BatchNorm without running
    statistics, which normalises by the batch's own.
    """
    if type(module) not in _BATCHNORMS or module.training or module.running_var is None:
        return None
    if "forward" in vars(module) or len(module._forward_hooks) != 1 or _global_forward_hooks():
        return None
    scale = torch.rsqrt(module.running_var.double() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.double()
    shift = -module.running_mean.double() * scale
    if module.bias is not None:
        shift = shift + module.bias.double()
    return scale, shift


def _global_forward_hooks() -> bool:
    """Tell whether hooks registered with ``register_module_forward_hook`` exist."""
    return bool(getattr(torch.nn.modules.module, "_global_forward_hooks", None))


# Largest ratio of a BatchNorm output's mean to its spread over the batch for which its
# Gram matrix is derived. The float32 output rounds each value to about 6e-8 of its
# size, which the derived matrix does not see, so this keeps that gap near 1e-6.
_MAX_MEAN_TO_SPREAD = 16.0


class _ChannelGrams:
    """The float64 per-channel Gram matrices of one layer output, and a way to recognise it.

    The output is referenced weakly, so holding this does not keep it alive. Inference
    tensors have no version counter, so an in-place change is detected by comparing the
    per-example, per-channel sums with those taken when the matrices were computed.

    NOTE: an in-place change that keeps every such sum, such as swapping two values
    within one example's channel, goes unnoticed. No in-place op of torch.nn does that.
    """

    def __init__(self, features: torch.Tensor, grams: torch.Tensor) -> None:
        self.grams = grams
        self._dtype = features.dtype if features.dtype == torch.float64 else torch.float32
        self._features = weakref.ref(features)
        self._sums = _channel_sums(features)
        self._positions = features[0, 0].numel()

    def scaled_gram(self, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor | None:
        """Return a Gram matrix of ``scale * x + shift`` per channel, if float32 keeps it.

        The matrix is that of ``scale * x`` up to a common shift of the examples, which
        is also a Gram matrix of the output, since the BatchNorm's shift is common to all
        examples. A large output mean leaves the examples of the real output
        apart by few float32 steps, or by none, so that its Gram matrix differs from
        the derived one. None then, and the caller computes the real output's matrix.
        """
        channels, n, _ = self.grams.shape
        # A matrix-vector product reads the per-channel matrices once.
        derived = torch.mv(self.grams.reshape(channels, n * n).T, scale.square()).reshape(n, n)
        values = self._sums.shape[0] * self._positions
        means = scale * (self._sums.double().sum(dim=0) / values) + shift
        mean_energy = values * means.square().sum()
        spread_energy = torch.trace(derived) - derived.sum() / n
        if not mean_energy <= _MAX_MEAN_TO_SPREAD**2 * spread_energy:
            return None
        return derived.to(self._dtype)

    def came_from(self, tensor: object) -> bool:
        """Tell whether ``tensor`` is the output these matrices came from, still unchanged."""
        if not isinstance(tensor, torch.Tensor) or self._features() is not tensor:
            return False
        return torch.equal(_channel_sums(tensor), self._sums)


def _channel_sums(features: torch.Tensor) -> torch.Tensor:
    # Half-precision sums could overflow to equal infinities.
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    return features.sum(dim=tuple(range(2, features.dim())), dtype=dtype)
