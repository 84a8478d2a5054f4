"""Building image classifiers from torchvision or pretrainedmodels, with their input settings.

Pretrained weights come from each library's download address into torch's hub cache
(``torch.hub.get_dir()/checkpoints``). A file already there is used without network
access. Every checkpoint is read with ``weights_only=True``: both libraries call
``torch.load`` themselves, so the loading is forced through the
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch of ``torch.serialization``.
"""

import contextlib
import dataclasses
import difflib
import functools
import logging
import os
import urllib.error
import warnings

import torch
from torch import nn

__all__ = [
    "LIBRARIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InputSpec",
    "ModelLoadError",
    "available_models",
    "build_model",
    "check_model_name",
    "input_spec",
    "weights_file",
]

logger = logging.getLogger(__name__)

LIBRARIES = ("torchvision", "pretrainedmodels")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelLoadError(ValueError):
    """A model cannot be built as requested: unknown name, missing weights, bad size."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The preprocessing a model was built for.

    Attributes:
        size: side of the square input, in pixels.
        mean: per-channel mean subtracted after scaling to ``value_range``, in the
            channel order of ``color_space``.
        std: per-channel standard deviation divided by after subtracting ``mean``.
        value_range: pixel range the model expects before normalisation, ``(0, 1)`` or
            ``(0, 255)``.
        color_space: ``"RGB"`` or ``"BGR"`` channel order.
    """

    size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    value_range: tuple[float, float] = (0.0, 1.0)
    color_space: str = "RGB"


@functools.cache
def available_models(library: str) -> tuple[str, ...]:
    """Return the image-classification model names that ``library`` can build."""
    if library == "torchvision":
        import torchvision

        return tuple(torchvision.models.list_models(module=torchvision.models))
    if library == "pretrainedmodels":
        return tuple(_pretrainedmodels().model_names)
    raise ValueError(f"expected a library in {LIBRARIES}, got {library!r}")


def _pretrainedmodels():
    # pretrainedmodels 0.7.4 builds its torchvision models with the deprecated
    # ``pretrained=`` argument, which warns on every model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pretrainedmodels
    return pretrainedmodels


def check_model_name(library: str, name: str) -> None:
    """Raise ModelLoadError unless ``library`` has a model called ``name``.

    The message suggests close names, and the other library when it has the name.
    """
    names = available_models(library)
    if name in names:
        return

    hints = []
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    if close:
        hints.append(f"did you mean {', '.join(close)}?")
    for other in LIBRARIES:
        if other != library and name in available_models(other):
            flag = "--torchvision 1" if other == "torchvision" else "--torchvision 0"
            hints.append(f"{other} has it: add {flag}")
    if not hints:
        hints.append(f"the {len(names)} names are listed by --list_models")
    raise ModelLoadError(f"unknown {library} model {name!r}; " + "; ".join(hints))


def _pretrainedmodels_settings(name: str) -> dict:
    settings = _pretrainedmodels().pretrained_settings[name]
    key = "imagenet" if "imagenet" in settings else next(iter(settings))
    return {"key": key, **settings[key]}


def input_spec(library: str, name: str, size: int) -> InputSpec:
    """Return the preprocessing ``name`` expects.

    Args:
        library: ``"torchvision"`` or ``"pretrainedmodels"``.
        name: model name.
        size: requested input side; pretrainedmodels models ignore it and use the size
            their settings give.
    """
    if library == "pretrainedmodels":
        settings = _pretrainedmodels_settings(name)
        return InputSpec(
            size=int(settings["input_size"][-1]),
            mean=tuple(float(value) for value in settings["mean"]),
            std=tuple(float(value) for value in settings["std"]),
            value_range=tuple(float(value) for value in settings["input_range"]),
            color_space=settings["input_space"],
        )

    import torchvision

    transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return InputSpec(size=size, mean=tuple(transforms.mean), std=tuple(transforms.std))


def weights_file(library: str, name: str) -> tuple[str, str]:
    """Return the download address of the pretrained weights and their cache path."""
    if library == "pretrainedmodels":
        url = _pretrainedmodels_settings(name)["url"]
    else:
        import torchvision

        url = torchvision.models.get_model_weights(name).DEFAULT.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return url, path


@contextlib.contextmanager
def _weights_only_loading():
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _random_size_arguments(name: str, size: int) -> dict:
    """Return constructor arguments that adapt a randomly initialised model to ``size``.

    torchvision's vision transformers and MaxViT fix their input size at construction.
    """
    if name.startswith("vit_"):
        return {"image_size": size}
    if name.startswith("maxvit_"):
        return {"input_size": (size, size)}
    return {}


def _construct(library: str, name: str, pretrained: bool, size: int) -> nn.Module:
    if library == "pretrainedmodels":
        module = _pretrainedmodels()
        if not pretrained:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return module.__dict__[name](num_classes=1000, pretrained=None)
        settings = _pretrainedmodels_settings(name)
        return module.__dict__[name](num_classes=settings["num_classes"], pretrained=settings["key"])

    import torchvision

    if pretrained:
        return torchvision.models.get_model(name, weights="DEFAULT")
    with warnings.catch_warnings():
        # inception_v3 and googlenet warn that their default initialisation will change.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torchvision.models.get_model(name, weights=None, **_random_size_arguments(name, size))


def build_model(
    library: str, name: str, pretrained: bool, size: int = 224, seed: int = 0
) -> nn.Module:
    """Build a model in eval mode on the CPU.

    Args:
        library: ``"torchvision"`` or ``"pretrainedmodels"``.
        name: model name in that library.
        pretrained: load the library's ImageNet weights; otherwise initialise randomly
            after ``torch.manual_seed(seed)``, so equal seeds give equal weights.
        size: input side, used to build torchvision transformers at random
            initialisation.
        seed: seed for random initialisation.

    Raises:
        ModelLoadError: for an unknown name or weights that cannot be downloaded.
    """
    check_model_name(library, name)
    torch.manual_seed(seed)
    if not pretrained:
        return _construct(library, name, False, size).eval()

    url, path = weights_file(library, name)
    if not os.path.exists(path):
        logger.info("downloading the weights of %s from %s to %s", name, url, path)
    try:
        with _weights_only_loading():
            model = _construct(library, name, True, size)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        raise ModelLoadError(
            f"could not download the pretrained weights of {name} from {url} ({error}). "
            f"Put the file {os.path.basename(url)} in {os.path.dirname(path)} "
            "(the folder follows $TORCH_HOME), or run with --pretrained 0"
        ) from error
    return model.eval()
