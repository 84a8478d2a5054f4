"""Images for the compared models: datasets, folders, bundled photographs, preprocessing."""

from .preprocess import Normalizer, resized_batches
from .sources import (
    SAMPLE_PHOTOS,
    DatasetError,
    ImageRegion,
    ImageSet,
    default_data_root,
    open_images,
    square_resize,
    torch_home,
)

__all__ = [
    "SAMPLE_PHOTOS",
    "DatasetError",
    "ImageRegion",
    "ImageSet",
    "Normalizer",
    "default_data_root",
    "open_images",
    "resized_batches",
    "square_resize",
    "torch_home",
]
