"""Forward hooks that turn layer outputs into Gram matrices while the model runs."""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cka.kernels import linear_gram

from .errors import ModelLoadError
from .layers import LayerInfo, first_float_tensor, restore_training_state, training_state

__all__ = ["KernelRecorder"]


class KernelRecorder:
    """Record the Gram matrix of every selected layer during forward passes.

    Each hook computes its layer's ``(n, n)`` Gram matrix from the output as soon as the
    module returns. The activation is never kept: this bounds memory by the kernels,
    and an in-place operation that runs later (a ``ReLU(inplace=True)`` after a
    BatchNorm) cannot change what was recorded.

    Use it as a context manager. Entering registers one hook per distinct module and
    puts the model in eval mode. Leaving removes every hook and restores every module's
    training flag, also after an exception. Nothing is added to the model's modules.

    Args:
        model: the model to run.
        layers: layers to record, in the order the returned stack should follow.
        gram: maps a ``(n, ...)`` output to its ``(n, n)`` Gram matrix.

    Example:
        >>> with KernelRecorder(model, layers) as recorder:
        ...     grams = recorder.grams(images)  # (len(layers), n, n)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerInfo],
        gram: Callable[[torch.Tensor], torch.Tensor] = linear_gram,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.gram = gram
        self._index = {(layer.module_name, layer.call): i for i, layer in enumerate(self.layers)}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[str, int] = {}
        self._grams: list[torch.Tensor | None] = []
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
                self._grams[index] = self.gram(first_float_tensor(output))

        return hook

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
        with torch.inference_mode():
            self.model(inputs)

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
