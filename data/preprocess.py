"""Per-model preprocessing: square resizing to uint8 batches, then normalisation.

The two steps are apart so that models with the same input size share the resized
batches, and only the cheap normalisation runs once per model, on its device.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .sources import ImageSet

__all__ = ["Normalizer", "resized_batches"]


class Normalizer:
    """Turn ``(B, 3, S, S)`` uint8 RGB batches into a model's normalised float32 input.

    Pixel values are scaled to ``value_range``, channels reordered for ``"BGR"``
    models, then ``mean`` is subtracted and the result divided by ``std``, per channel
    in the model's channel order.

    Args:
        mean: per-channel mean, in ``color_space`` order and ``value_range`` units.
        std: per-channel standard deviation.
        value_range: pixel range the model expects, ``(0, 1)`` or ``(0, 255)``.
        color_space: ``"RGB"`` or ``"BGR"``.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        value_range: tuple[float, float] = (0.0, 1.0),
        color_space: str = "RGB",
    ) -> None:
        if color_space not in ("RGB", "BGR"):
            raise ValueError(f"expected color_space 'RGB' or 'BGR', got {color_space!r}")
        low, high = value_range
        std_tensor = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # x_normalised = (low + (high - low) * pixel / 255 - mean) / std = pixel * scale + bias
        self.scale = (high - low) / 255.0 / std_tensor
        self.bias = (low - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / std_tensor
        self.bgr = color_space == "BGR"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalise a ``(B, 3, S, S)`` uint8 RGB batch on its own device."""
        if self.bgr:
            pixels = pixels.flip(1)
        scale = self.scale.to(pixels.device)
        bias = self.bias.to(pixels.device)
        return torch.addcmul(bias, pixels.to(torch.float32), scale)


class _ResizedImages(Dataset):
    def __init__(self, images: ImageSet, size: int) -> None:
        self.images = images
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self.images.resized(index, self.size))


def _stack_channels_first(images: list[np.ndarray]) -> torch.Tensor:
    """Stack ``(S, S, 3)`` uint8 arrays into one ``(B, 3, S, S)`` tensor.

    Stacking the arrays as they are and permuting the whole batch once is much faster
    than stacking per-image channel-first views.
    """
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def resized_batches(
    images: ImageSet,
    size: int,
    batch_size: int,
    num_workers: int = 0,
    batch_indices: Sequence[int] | None = None,
) -> DataLoader:
    """Return a loader of ``(batch_size, 3, size, size)`` uint8 RGB batches, in order.

    Batch ``b`` contains images ``b * batch_size`` to ``(b + 1) * batch_size - 1`` and nothing
    is shuffled, so two models given the same ``images`` and ``batch_size`` see the same
    batches.

    Args:
        images: the images.
        size: side of the square output.
        batch_size: images per batch.
        num_workers: worker processes; 0 loads in this process.
        batch_indices: the batches to load, in this order; default: all of them.
    """
    dataset = _ResizedImages(images, size)
    if batch_indices is None:
        batch_indices = range(math.ceil(len(images) / batch_size))
    sampler = [
        list(range(index * batch_size, min((index + 1) * batch_size, len(images))))
        for index in batch_indices
    ]
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_stack_channels_first
    )
