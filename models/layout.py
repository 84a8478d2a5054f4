"""Memory layout of a model's images and activations: channels first or channels last.

On the CPU, torch runs 2-D convolutions on channels-last tensors without converting
them to and from the layout its convolution library computes in. On a 2-core AMD EPYC,
the forward passes of resnet18 and resnet34 took about 0.7 times as long in channels last
at 64 x 64 pixels, and 0.8 times as long at 224 x 224, in one measurement each. Those of
vgg11, mobilenet_v2, densenet121 and googlenet took 0.5 to 0.8 times as long at 64 x 64.
Two transformers (vit_b_16 and swin_t), whose only convolution cuts the image into
patches, gained nothing. The layout changes the float32 rounding of the convolutions, not
what they compute.
"""

import torch
from torch import nn

__all__ = ["prefers_channels_last", "set_channels_last", "with_layout"]

# Fewest 2-D convolutions for channels last to pay off. A patch embedding is a single one.
_MIN_CONVOLUTIONS = 2


def prefers_channels_last(model: nn.Module, device: str | torch.device) -> bool:
    """Tell whether ``model`` should run channels last on ``device``.

    Only CPU runs of models with at least two 2-D convolutions and no 5-D parameter or
    buffer qualify. torch has no channels-last layout for 5-D tensors, and
    ``set_channels_last`` would raise on them.

    NOTE: channels last was measured on CPUs only; GPU runs keep channels first.
    """
    if torch.device(device).type != "cpu":
        return False
    convolutions = sum(isinstance(module, nn.Conv2d) for module in model.modules())
    if convolutions < _MIN_CONVOLUTIONS:
        return False
    tensors = [*model.parameters(), *model.buffers()]
    return all(tensor.dim() != 5 for tensor in tensors)


def set_channels_last(model: nn.Module, channels_last: bool) -> nn.Module:
    """Lay out the model's 4-D parameters and buffers channels last, or channels first.

    The model is changed in place and returned.
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(memory_format=layout)


def with_layout(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Return a batch of ``(n, channels, height, width)`` images in the chosen layout.

    Anything but a 4-D tensor is returned unchanged.
    """
    if not channels_last or images.dim() != 4:
        return images
    return images.contiguous(memory_format=torch.channels_last)
