"""Where the images come from: a torchvision dataset, a folder, or bundled photographs.

Every source returns PIL images in a fixed order. ``open_images`` picks a deterministic,
seeded subset of the requested size, so every model of a run gets the same images in
the same order and the same batches.
"""

import concurrent.futures
import dataclasses
import difflib
import hashlib
import inspect
import logging
import os
import urllib.error
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "SAMPLE_PHOTOS",
    "DatasetError",
    "ImageRegion",
    "ImageSet",
    "default_data_root",
    "open_images",
    "square_resize",
    "torch_home",
]

logger = logging.getLogger(__name__)

SAMPLE_PHOTOS = "sample_photos"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Photographs and micrographs that scikit-image ships inside its wheel, so they need no
# download. Drawings and synthetic images of skimage.data are left out.
_PHOTO_FILES = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)

# Crop side as a fraction of the photo's shorter side.
_CROP_FRACTION = (0.3, 0.9)


class DatasetError(ValueError):
    """Images cannot be provided as requested: unknown name, missing data, too few images."""


@dataclasses.dataclass(frozen=True)
class ImageRegion:
    """Where one image of an ImageSet lies in its source picture.

    Attributes:
        image: the source picture.
        box: ``(left, top, right, bottom)`` of the image in ``image``; None for the
            whole picture.
        mirrored: whether the image is the region flipped left to right.
        reduced: ``image`` shrunk by 2, 4, 8, ... (box filter), to resize small crops of
            a large picture without reading all of its pixels; may be empty.
    """

    image: Image.Image
    box: tuple[int, int, int, int] | None = None
    mirrored: bool = False
    reduced: tuple[Image.Image, ...] = ()


def _center_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


_REDUCING_GAP = 2.0


def _halvings(image: Image.Image, smallest: int = 64) -> tuple[Image.Image, ...]:
    """Return ``image`` shrunk by 2, 4, 8, ... while the shorter side stays >= ``smallest``."""
    reduced = []
    while min(image.size) // 2 >= smallest:
        image = image.reduce(2)
        reduced.append(image)
    return tuple(reduced)


def square_resize(region: ImageRegion, size: int) -> Image.Image:
    """Resize the center square of a region to ``size`` x ``size`` RGB pixels.

    One antialiased bilinear resize does the crop and the scaling. It starts from the
    smallest of the region's reduced copies that keeps 2 source pixels per output pixel,
    and ``reducing_gap`` shrinks what remains by an integer factor first. Both are much
    faster than a plain resize of a large picture and differ from it by about one grey
    level on photographs.
    """
    image = region.image
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    left, top, right, bottom = region.box or (0, 0, image.width, image.height)
    square = _center_square(right - left, bottom - top)
    box = (left + square[0], top + square[1], left + square[2], top + square[3])

    # Start from the smallest reduced copy that still has 2 source pixels per output pixel.
    factor = 1
    for reduced in region.reduced:
        if (box[2] - box[0]) / (2 * factor) < _REDUCING_GAP * size:
            break
        image, factor = reduced, 2 * factor
    if factor > 1:
        box = tuple(value / factor for value in box)
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=_REDUCING_GAP)
    if region.mirrored:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return resized if resized.mode == "RGB" else resized.convert("RGB")


@dataclasses.dataclass
class ImageSet(Sequence):
    """A fixed, ordered list of images.

    Indexing returns the image as an RGB PIL image at its own resolution; ``resized``
    returns its center square at a model's input size, which is faster for large
    pictures.

    Attributes:
        description: what the images are, for logs and the run record.
        indices: position of each image in the underlying dataset, folder or crop list.
        source: identity of the underlying images, which changes when they change;
            with ``indices`` it keys cached results.
    """

    description: str
    indices: list[int]
    _load: object = dataclasses.field(repr=False)
    source: str = ""

    def __len__(self) -> int:
        return len(self.indices)

    def region(self, position: int) -> ImageRegion:
        """Return where image ``position`` lies in its source picture."""
        return self._load(self.indices[position])

    def __getitem__(self, position):
        if isinstance(position, slice):
            raise TypeError("ImageSet does not support slicing")
        region = self.region(position)
        image = region.image if region.box is None else region.image.crop(region.box)
        if region.mirrored:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image if image.mode == "RGB" else image.convert("RGB")

    def resized(self, position: int, size: int) -> Image.Image:
        """Return image ``position`` as a ``size`` x ``size`` RGB image (center square)."""
        return square_resize(self.region(position), size)


def torch_home() -> str:
    """Return torch's cache folder: ``$TORCH_HOME``, by default ``~/.cache/torch``."""
    return os.environ.get(
        "TORCH_HOME",
        os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"),
    )


def default_data_root() -> str:
    """Return ``$TORCH_HOME/datasets``, by default ``~/.cache/torch/datasets``."""
    return os.path.join(torch_home(), "datasets")


def _seeded_subset(total: int, count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:count].tolist()


def _check_count(available: int, count: int, what: str) -> None:
    if count > available:
        raise DatasetError(
            f"the run needs {count} images (--batch_size x --dataloader_size) but {what} "
            f"has {available}; lower --batch_size or --dataloader_size, or add images"
        )


class _PhotoCrops:
    """Crop ``i``: photo ``i mod P``, with a crop and a flip seeded by ``(seed, i)``.

    Any number of images, each the same in every run. A class rather than a closure,
    so that DataLoader workers started by "spawn" can receive it.
    """

    def __init__(self, photos: list[Image.Image], seed: int) -> None:
        self.photos = photos
        self.reduced = [_halvings(photo) for photo in photos]
        self.seed = seed

    def __call__(self, index: int) -> ImageRegion:
        photo = self.photos[index % len(self.photos)]
        rng = np.random.default_rng([self.seed, index])
        side = int(min(photo.size) * rng.uniform(*_CROP_FRACTION))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        box = (left, top, left + side, top + side)
        mirrored = bool(rng.random() < 0.5)
        return ImageRegion(photo, box, mirrored, self.reduced[index % len(self.photos)])


def _to_8_bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit and float grayscale to 8 bits; ``convert`` would clip them.

    16-bit modes map 0..65535 to 0..255. Mode ``I`` is read as 16-bit when its values fit,
    and mode ``F`` as 0..1 when they fit; otherwise the image's own maximum maps to 255.
    """
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    largest = float(pixels.max()) if pixels.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and largest <= 65535):
        high = 65535.0
    elif image.mode == "F" and largest <= 1.0:
        high = 1.0
    else:
        high = max(largest, 1.0)
    scaled = np.clip(pixels / high * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


class _FileLoader:
    """Open image ``i`` of a list of files; a class so that spawned workers can receive it."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __call__(self, index: int) -> ImageRegion:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DatasetError(
                f"cannot read the image file {path} ({type(error).__name__}: {error}); "
                "remove or replace it"
            ) from error
        return ImageRegion(_to_8_bit(image))


class _DatasetLoader:
    """Return image ``i`` of a torchvision dataset as a PIL image."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __call__(self, index: int) -> ImageRegion:
        image = self.dataset[index][0]
        if not isinstance(image, Image.Image):
            import torchvision.transforms.functional

            image = torchvision.transforms.functional.to_pil_image(image)
        return ImageRegion(_to_8_bit(image))


def _read_photo(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _sample_photos(count: int, seed: int) -> ImageSet:
    import skimage.data

    folder = skimage.data.data_dir
    paths = [os.path.join(folder, name) for name in _PHOTO_FILES]
    paths = [path for path in paths if os.path.exists(path)]
    if len(paths) < 4:
        raise DatasetError(
            f"scikit-image's bundled photographs were not found in {folder}; "
            "reinstall scikit-image or use --dataset with a folder of images"
        )
    # Decoding releases the GIL, so threads read the photographs in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as executor:
        photos = list(executor.map(_read_photo, paths))
    crop = _PhotoCrops(photos, seed)

    description = f"{count} seeded square crops of {len(photos)} scikit-image photographs"
    source = f"sample_photos v1, seed {seed}, " + ", ".join(
        f"{os.path.basename(path)} {os.path.getsize(path)}" for path in paths
    )
    return ImageSet(description, list(range(count)), crop, source)


def _folder_images(folder: str, count: int, seed: int) -> ImageSet:
    paths = []
    for root, directories, files in os.walk(folder):
        directories.sort()
        paths.extend(
            os.path.join(root, name)
            for name in sorted(files)
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
    _check_count(len(paths), count, f"the folder {folder}")

    indices = _seeded_subset(len(paths), count, seed)
    listing = hashlib.sha256()
    for path in paths:
        status = os.stat(path)
        listing.update(f"{os.path.relpath(path, folder)}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    source = f"folder {os.path.abspath(folder)}, files {listing.hexdigest()}"
    selected = [paths[index] for index in indices]
    _check_headers(selected)
    return ImageSet(f"{count} of the {len(paths)} images in {folder}", indices, _FileLoader(paths), source)


def _check_headers(paths: list[str]) -> None:
    """Raise DatasetError for the first file that is not an image PIL can identify.

    Only headers are read, so this is quick; a file damaged further on is reported when
    it is loaded.
    """
    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError) as error:
            raise DatasetError(
                f"cannot read the image file {path} ({type(error).__name__}); remove or replace it"
            ) from error


def _torchvision_dataset_class(name: str):
    import torchvision.datasets

    # Base classes read a folder themselves; a folder path passed to --dataset does that.
    if name in ("VisionDataset", "DatasetFolder", "ImageFolder"):
        return None
    candidate = getattr(torchvision.datasets, name, None)
    if inspect.isclass(candidate) and issubclass(candidate, torchvision.datasets.VisionDataset):
        return candidate
    return None


def _torchvision_dataset_names() -> list[str]:
    import torchvision.datasets

    return [name for name in dir(torchvision.datasets) if _torchvision_dataset_class(name)]


# Names that torchvision datasets give their evaluation splits, in order of preference.
_EVALUATION_SPLITS = ("test", "val", "valid", "validation")


def _split_rejected(error: Exception) -> bool:
    return isinstance(error, ValueError) and "split" in str(error).lower()


def _construct_dataset(dataset_class, root: str, download: bool):
    """Build a torchvision dataset on its evaluation split, where it has one.

    Returns:
        The dataset and the constructor arguments used.
    """
    parameters = inspect.signature(dataset_class.__init__).parameters
    if list(parameters)[1:2] != ["root"]:
        raise TypeError(f"its first argument is {list(parameters)[1:2] or 'missing'}, not root")
    base = {"download": download} if "download" in parameters else {}
    if "train" in parameters:
        choices = [{"train": False}]
    elif "split" in parameters:
        default = parameters["split"].default
        choices = [{"split": split} for split in _EVALUATION_SPLITS]
        if default is not inspect.Parameter.empty:
            choices.append({"split": default})
    else:
        choices = [{}]

    for choice in choices[:-1]:
        try:
            return dataset_class(root, **choice, **base), {**choice, **base}
        except ValueError as error:
            if not _split_rejected(error):
                raise
    return dataset_class(root, **choices[-1], **base), {**choices[-1], **base}


def _torchvision_images(dataset_class, count: int, seed: int, root: str, download: bool) -> ImageSet:
    name = dataset_class.__name__
    try:
        dataset, arguments = _construct_dataset(dataset_class, root, download)
    except TypeError as error:
        raise DatasetError(
            f"--dataset {name} cannot be used: its constructor needs arguments other than a "
            f"data folder ({error}); use a folder of its images instead"
        ) from error
    except (RuntimeError, OSError, urllib.error.URLError, ValueError) as error:
        hint = "download it while online" if download else "run without --download 0 while online"
        raise DatasetError(
            f"the torchvision dataset {name} is not in {root} and could not be obtained "
            f"({error}). Put its files in {root} as torchvision expects, {hint}, or point "
            "--data_root at a copy"
        ) from error

    split = ", ".join(f"{key}={value}" for key, value in arguments.items() if key != "download")
    _check_count(len(dataset), count, f"{name} ({split or 'whole dataset'})")

    indices = _seeded_subset(len(dataset), count, seed)
    description = f"{count} seeded images of {name} ({split or 'whole dataset'}) from {root}"
    source = f"torchvision {name} ({split}) in {os.path.abspath(root)}, {len(dataset)} images"
    return ImageSet(description, indices, _DatasetLoader(dataset), source)


def open_images(
    dataset: str, count: int, seed: int = 0, data_root: str | None = None, download: bool = True
) -> ImageSet:
    """Open ``count`` images of a dataset in a deterministic order.

    Args:
        dataset: ``"sample_photos"``; a path to a folder of images, searched
            recursively; or a torchvision dataset class name such as ``"CIFAR10"``, whose
            evaluation split is used when it has one.
        count: number of images to provide.
        seed: seed of the subset and, for ``sample_photos``, of the crops.
        data_root: folder of torchvision datasets; defaults to ``$TORCH_HOME/datasets``.
        download: let torchvision download a missing dataset.

    Raises:
        DatasetError: for an unknown dataset, missing data or too few images.
    """
    if dataset == SAMPLE_PHOTOS:
        return _sample_photos(count, seed)

    if os.path.isdir(dataset):
        return _folder_images(dataset, count, seed)

    dataset_class = _torchvision_dataset_class(dataset)
    if dataset_class is not None:
        root = data_root or default_data_root()
        return _torchvision_images(dataset_class, count, seed, root, download)

    if os.path.isfile(dataset):
        raise DatasetError(
            f"--dataset {dataset} is a file; give the folder that contains the images"
        )
    if os.path.sep in dataset or dataset.startswith((".", "~")) or os.path.exists(dataset):
        raise DatasetError(f"--dataset {dataset}: no folder of that name exists")
    known = _torchvision_dataset_names()
    close = difflib.get_close_matches(dataset, known, n=3, cutoff=0.5)
    close += [name for name in known if name.lower() == dataset.lower() and name not in close]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise DatasetError(
        f"--dataset {dataset} is neither a torchvision dataset class, an existing folder of "
        f"images nor {SAMPLE_PHOTOS}.{hint}"
    )
