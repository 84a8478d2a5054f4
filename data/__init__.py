"""Images for the compared models: datasets, folders, bundled photographs, batching."""

from .preprocess import batches, make_transform
from .sources import SAMPLE_PHOTOS, DatasetError, ImageSet, default_data_root, open_images

__all__ = [
    "SAMPLE_PHOTOS",
    "DatasetError",
    "ImageSet",
    "batches",
    "default_data_root",
    "make_transform",
    "open_images",
]
