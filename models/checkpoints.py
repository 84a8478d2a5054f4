"""Loading a user's checkpoint file into a model of the zoo.

Accepted files: a state dict saved with ``torch.save`` (``.pt``, ``.pth``, ``.bin``,
or any other name), a checkpoint dict that contains one under a usual key, and
``.safetensors``. ``torch.load`` runs with ``weights_only=True``, which refuses pickled
code. Keys saved from ``nn.DataParallel`` or DistributedDataParallel lose their
``module.`` prefix.
"""

import os
import pickle
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .errors import ModelLoadError

__all__ = ["CheckpointError", "load_state_dict", "load_weights"]

# Keys under which training scripts commonly nest the state dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
_PREFIXES = ("module.", "_orig_mod.")
_LISTED_KEYS = 5


class CheckpointError(ModelLoadError):
    """A checkpoint file cannot be read or does not fit the model."""


def _is_state_dict(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(key, str) for key in value)
        and all(isinstance(item, torch.Tensor) for item in value.values())
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its state dict on the CPU.

    Raises:
        CheckpointError: when the file is missing, unreadable, or contains no state dict.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} not found")

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            content = load_file(path, device="cpu")
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # each format raises its own types for a damaged file
        if isinstance(error, pickle.UnpicklingError):
            reason = "it contains pickled objects other than tensors, or it is damaged"
        else:
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        raise CheckpointError(
            f"cannot read checkpoint {path}: {reason}. Save a state dict with "
            "torch.save(model.state_dict(), path) or safetensors"
        ) from error

    if isinstance(content, Mapping) and not _is_state_dict(content):
        for key in _NESTED_KEYS:
            if _is_state_dict(content.get(key)):
                content = content[key]
                break
    if not _is_state_dict(content):
        found = f"keys {sorted(content)[:_LISTED_KEYS]}" if isinstance(content, Mapping) else type(content).__name__
        raise CheckpointError(
            f"checkpoint {path} contains no state dict (found {found}); expected a dict of "
            f"tensors, possibly under one of {', '.join(_NESTED_KEYS)}"
        )
    return _strip_prefixes(dict(content))


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    return shown + (f" and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else "")


def _classifier_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Return the class count of the checkpoint when only the output layer's size differs."""
    own = model.state_dict()
    mismatched = [key for key in state if key in own and own[key].shape != state[key].shape]
    if not mismatched:
        return None
    output_layer = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))][-1]
    if all(key.rsplit(".", 1)[0] == output_layer for key in mismatched):
        return int(state[f"{output_layer}.weight"].shape[0]) if f"{output_layer}.weight" in state else None
    return None


def load_weights(
    model: nn.Module, path: str, rebuild: Callable[[int], nn.Module]
) -> nn.Module:
    """Load a checkpoint into ``model``, rebuilding it when the class count differs.

    Args:
        model: a freshly built model of the checkpoint's architecture.
        path: the checkpoint file.
        rebuild: builds the same architecture with a given number of classes; used when
            only the output layer's size differs from the checkpoint (a 10-class
            fine-tune of an ImageNet model).

    Returns:
        The model with the checkpoint's weights, which may be a new instance.

    Raises:
        CheckpointError: for an unreadable file, or keys or shapes that do not match,
            listing the first few of each.
    """
    state = load_state_dict(path)
    classes = _classifier_classes(model, state)
    if classes is not None:
        model = rebuild(classes)

    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong_shape = [
        f"{key} {list(state[key].shape)} (model: {list(own[key].shape)})"
        for key in state
        if key in own and own[key].shape != state[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {_listed(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(problems)}. "
            "Check that the checkpoint was saved from this architecture"
        )

    model.load_state_dict(state)
    return model
