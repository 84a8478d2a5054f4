"""Building image classifiers from torchvision, pretrainedmodels or timm, with their inputs.

Pretrained weights of torchvision and pretrainedmodels come from each library's
download address into torch's hub cache (``torch.hub.get_dir()/checkpoints``); timm's
come from the Hugging Face hub into its cache. A file already cached is used without
network access. Every checkpoint is read with ``weights_only=True``: the libraries call
``torch.load`` themselves, so the loading is forced through the
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch of ``torch.serialization``.
"""

import contextlib
import dataclasses
import difflib
import functools
import logging
import os
import pickle
import urllib.error
import warnings

import torch
from torch import nn

from .checkpoints import load_weights
from .errors import ModelLoadError

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

LIBRARIES = ("torchvision", "pretrainedmodels", "timm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    if library == "timm":
        import timm

        return tuple(timm.list_models())
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
    if library == "timm":
        import timm

        # timm also accepts "architecture.pretrained_tag" names such as resnet18.a1_in1k.
        if timm.is_model(name):
            return

    hints = []
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    if close:
        hints.append(f"did you mean {', '.join(close)}?")
    for other in LIBRARIES:
        if other != library and name in available_models(other):
            flag = "--torchvision 1" if other == "torchvision" else f"--library {other}"
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

    if library == "timm":
        import timm

        config = timm.models.get_pretrained_cfg(name)
        if config is None:
            return InputSpec(size=size)
        return InputSpec(size=size, mean=tuple(config.mean), std=tuple(config.std))

    import torchvision

    transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return InputSpec(size=size, mean=tuple(transforms.mean), std=tuple(transforms.std))


def weights_file(library: str, name: str) -> tuple[str, str]:
    """Return the download address of the pretrained weights and their cache path."""
    if library == "timm":
        import timm
        from huggingface_hub.constants import HF_HUB_CACHE

        config = timm.models.get_pretrained_cfg(name)
        source = getattr(config, "hf_hub_id", None) or getattr(config, "url", None) or name
        return f"https://huggingface.co/{source}", HF_HUB_CACHE
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


def _construct(library: str, name: str, pretrained: bool, size: int, classes: int | None = None) -> nn.Module:
    """Build a model; ``classes`` overrides the class count of a random initialisation."""
    if library == "pretrainedmodels":
        module = _pretrainedmodels()
        with warnings.catch_warnings():
            # Its torchvision-based models pass the deprecated pretrained= argument.
            warnings.simplefilter("ignore")
            if not pretrained:
                return module.__dict__[name](num_classes=classes or 1000, pretrained=None)
            settings = _pretrainedmodels_settings(name)
            return module.__dict__[name](num_classes=settings["num_classes"], pretrained=settings["key"])

    if library == "timm":
        import timm

        arguments = {} if classes is None else {"num_classes": classes}
        config = timm.models.get_pretrained_cfg(name)
        if config is not None and tuple(config.input_size[-2:]) != (size, size):
            # Transformers fix their input size at construction; other models ignore it.
            try:
                return timm.create_model(name, pretrained=pretrained, img_size=size, **arguments)
            except TypeError:
                pass
        return timm.create_model(name, pretrained=pretrained, **arguments)

    import torchvision

    if pretrained:
        return torchvision.models.get_model(name, weights="DEFAULT")
    arguments = _random_size_arguments(name, size)
    if classes is not None:
        arguments["num_classes"] = classes
    with warnings.catch_warnings():
        # inception_v3 and googlenet warn that their default initialisation will change.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torchvision.models.get_model(name, weights=None, **arguments)


def _download_hint(library: str, name: str) -> str:
    url, path = weights_file(library, name)
    if library == "timm":
        return (
            f"timm downloads it from {url} into the Hugging Face cache {path}; copy the cache "
            "there and set HF_HUB_OFFLINE=1, or run with --pretrained 0"
        )
    return (
        f"Put the file {os.path.basename(url)} from {url} in {os.path.dirname(path)} "
        "(the folder follows $TORCH_HOME), or run with --pretrained 0"
    )


def build_model(
    library: str,
    name: str,
    pretrained: bool,
    size: int = 224,
    seed: int = 0,
    weights: str | None = None,
) -> nn.Module:
    """Build a model in eval mode on the CPU.

    Args:
        library: ``"torchvision"``, ``"pretrainedmodels"`` or ``"timm"``.
        name: model name in that library.
        pretrained: load the library's ImageNet weights; otherwise initialise randomly
            after ``torch.manual_seed(seed)``, so equal seeds give equal weights.
        size: input side, used to build transformers for that size.
        seed: seed for random initialisation.
        weights: a checkpoint file to load instead of the library's weights. When only
            its output layer's size differs, the model is rebuilt with its class count.

    Raises:
        ModelLoadError: for an unknown name, weights that cannot be downloaded, or a
            checkpoint that does not fit.
    """
    check_model_name(library, name)
    torch.manual_seed(seed)
    if weights is not None:

        def rebuild(classes: int) -> nn.Module:
            torch.manual_seed(seed)
            return _construct(library, name, False, size, classes)

        return load_weights(_construct(library, name, False, size), weights, rebuild).eval()
    if not pretrained:
        return _construct(library, name, False, size).eval()

    if library != "timm":
        url, path = weights_file(library, name)
        if not os.path.exists(path):
            logger.info("downloading the weights of %s from %s to %s", name, url, path)
    try:
        with _weights_only_loading():
            model = _construct(library, name, True, size)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        location = weights_file(library, name)[1]
        raise ModelLoadError(
            f"the cached pretrained weights of {name} ({location}) are damaged or not a plain "
            f"weights file ({type(error).__name__}). Delete the file and run again while "
            "online, or copy the right file there"
        ) from error
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
        raise ModelLoadError(
            f"could not download the pretrained weights of {name} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            + _download_hint(library, name)
        ) from error
    return model.eval()
