"""Per-model preprocessing and batching of an ImageSet."""

from collections.abc import Callable, Sequence

import torch
import torchvision.transforms.functional as functional
from PIL import Image
from torch.utils.data import DataLoader, Dataset

__all__ = ["batches", "make_transform"]


def make_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    value_range: tuple[float, float] = (0.0, 1.0),
    color_space: str = "RGB",
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the transform from an RGB PIL image to a model's normalised input.

    The shorter side is resized to ``size`` with antialiasing and the center square is
    cropped. Pixel values are scaled to ``value_range``, channels reordered for
    ``"BGR"`` models, then ``mean`` is subtracted and the result divided by ``std``.

    Returns:
        A function mapping a PIL image to a ``(3, size, size)`` float32 tensor.
    """
    if color_space not in ("RGB", "BGR"):
        raise ValueError(f"expected color_space 'RGB' or 'BGR', got {color_space!r}")
    low, high = value_range
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def transform(image: Image.Image) -> torch.Tensor:
        image = functional.resize(image, size, antialias=True)
        image = functional.center_crop(image, size)
        pixels = functional.pil_to_tensor(image).to(torch.float32) / 255.0
        pixels = low + (high - low) * pixels
        if color_space == "BGR":
            pixels = pixels.flip(0)
        return (pixels - mean_tensor) / std_tensor

    return transform


class _TransformedImages(Dataset):
    def __init__(self, images: Sequence[Image.Image], transform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.images[index])


def batches(
    images: Sequence[Image.Image],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
) -> DataLoader:
    """Return a loader of ``(batch_size, 3, S, S)`` batches in the order of ``images``.

    Consecutive images form each batch and nothing is shuffled, so two models given the
    same ``images`` and ``batch_size`` see the same batches.
    """
    return DataLoader(
        _TransformedImages(images, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
