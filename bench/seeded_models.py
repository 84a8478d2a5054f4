"""Randomly initialised torchvision models, built the same way for the floor and the API timings."""

from collections.abc import Sequence

import torch
import torchvision
from torch import nn


def build_models(names: Sequence[str], seed: int) -> list[nn.Module]:
    """Build each model in eval mode with ``weights=None`` after ``torch.manual_seed(seed)``."""
    models = []
    for name in names:
        torch.manual_seed(seed)
        models.append(torchvision.models.get_model(name, weights=None).eval())
    return models


def state_bytes(models: Sequence[nn.Module]) -> int:
    """Return the bytes of the models' parameters and buffers."""
    return sum(
        tensor.numel() * tensor.element_size()
        for model in models
        for tensor in [*model.parameters(), *model.buffers()]
    )
