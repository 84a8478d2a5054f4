"""Layer selection, execution order and hooks, on torchvision's resnet18 and tiny models."""

import pytest
import torch
from torch import nn

from models import KernelRecorder, LayerInfo, build_model, select_layers, trace_calls, union_of_layers


@pytest.fixture(scope="module")
def resnet18():
    model = build_model("torchvision", "resnet18", pretrained=False, size=32)
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, trace_calls(model, inputs)


def _kernel_error(gram: torch.Tensor, features: torch.Tensor) -> float:
    """Largest difference between a recorded Gram matrix and the exact one of ``features``.

    Both are double-centered first, since a recorder may shift the examples, and the
    difference is relative to the largest centered entry.
    """
    n = features.shape[0]
    center = torch.eye(n, dtype=torch.float64) - 1.0 / n
    flat = features.detach().double().reshape(n, -1)
    expected = center @ (flat @ flat.T) @ center
    return float((center @ gram.double() @ center - expected).abs().max() / expected.abs().max())


def _names(selection):
    return [layer.name for layer in selection.layers]


def test_resnet18_depth_one(resnet18):
    model, calls = resnet18

    selection = select_layers(model, calls, batch_size=2, depth=1)

    assert _names(selection) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert selection.removed_output == "fc"
    assert selection.dropped == {}


def test_resnet18_depth_two(resnet18):
    model, calls = resnet18

    selection = select_layers(model, calls, batch_size=2, depth=2)

    blocks = [f"layer{stage}.{block}" for stage in range(1, 5) for block in range(2)]
    assert _names(selection) == ["conv1", "bn1", *blocks]


def test_resnet18_leaves(resnet18):
    model, calls = resnet18

    selection = select_layers(model, calls, batch_size=2, depth=-1)
    names = _names(selection)

    # 20 convolutions and 20 BatchNorms; fc is the removed output layer.
    assert len(names) == 40
    assert names[:4] == ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1"]
    assert names[-4:] == ["layer4.1.conv1", "layer4.1.bn1", "layer4.1.conv2", "layer4.1.bn2"]
    assert names.index("layer2.0.bn2") < names.index("layer2.0.downsample.0")


def test_resnet18_leaves_keep_output_layer(resnet18):
    model, calls = resnet18

    selection = select_layers(model, calls, batch_size=2, depth=-1, remove_output_layer=False)

    assert len(selection.layers) == 41
    assert selection.layers[-1].name == "fc"
    assert selection.removed_output is None


def test_resnet18_conv_only(resnet18):
    model, calls = resnet18

    selection = select_layers(model, calls, batch_size=2, conv_only=True, kernel_range=(3, 100))
    names = _names(selection)

    # conv1 is 7x7 and the 16 block convolutions 3x3; downsample convolutions are 1x1.
    assert len(names) == 17
    assert names[0] == "conv1"
    assert not any("downsample" in name for name in names)
    assert all(layer.module_type == "Conv2d" for layer in selection.layers)


def test_resnet18_conv_only_exact_size(resnet18):
    model, calls = resnet18

    selection = select_layers(model, calls, batch_size=2, conv_only=True, kernel_range=(1, 1))

    assert _names(selection) == [f"layer{stage}.0.downsample.0" for stage in (2, 3, 4)]


def test_depth_beyond_deepest_is_clamped(resnet18):
    model, calls = resnet18

    selection = select_layers(model, calls, batch_size=2, depth=9)

    assert selection.depth == 4
    assert _names(selection) == _names(select_layers(model, calls, batch_size=2, depth=-1))


def test_relu_called_twice_gives_two_layers(resnet18):
    model, calls = resnet18

    selection = select_layers(model, calls, batch_size=2, depth=-1, include_parameter_free=True)
    names = _names(selection)

    assert "layer1.0.relu#1" in names
    assert "layer1.0.relu#2" in names
    assert names.index("layer1.0.bn1") < names.index("layer1.0.relu#1") < names.index("layer1.0.conv2")
    assert names.index("layer1.0.bn2") < names.index("layer1.0.relu#2")


class DefinedOutOfOrder(nn.Module):
    """``late`` is defined first but runs last; ``unused`` never runs."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(6, 3)
        self.early = nn.Linear(4, 6)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.late(torch.relu(self.early(x)))


class Stages(nn.Module):
    """``stages`` is a ModuleList that never runs itself, like ConvNeXt's and MaxViT's."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x


def test_module_list_is_replaced_by_children():
    model = Stages()
    calls = trace_calls(model, torch.randn(2, 4))

    selection = select_layers(model, calls, batch_size=2, depth=1, remove_output_layer=False)

    assert _names(selection) == ["stages.0", "stages.1"]
    assert list(selection.expanded) == ["stages"]
    assert selection.dropped == {}


def test_rows_follow_execution_order():
    model = DefinedOutOfOrder()
    calls = trace_calls(model, torch.randn(2, 4))

    selection = select_layers(model, calls, batch_size=2, depth=-1, remove_output_layer=False)

    assert _names(selection) == ["early", "late"]
    assert selection.dropped == {"unused": "never ran during the forward pass"}


def test_labels_match_recorded_rows():
    model = DefinedOutOfOrder()
    inputs = torch.randn(5, 4)
    calls = trace_calls(model, inputs[:2])
    layers = select_layers(model, calls, batch_size=2, depth=-1, remove_output_layer=False).layers

    with KernelRecorder(model, layers) as recorder:
        grams = recorder.grams(inputs)

    early = model.early(inputs)
    assert _kernel_error(grams[0], early) <= 1e-5
    assert _kernel_error(grams[1], model.late(torch.relu(early))) <= 1e-5


class SharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)

    def forward(self, x):
        return self.block(torch.tanh(self.block(x)))


def test_module_called_twice_gives_calls_in_order():
    model = SharedBlock()
    inputs = torch.randn(6, 4)
    calls = trace_calls(model, inputs[:2])
    layers = select_layers(model, calls, batch_size=2, depth=-1, remove_output_layer=False).layers

    with KernelRecorder(model, layers) as recorder:
        grams = recorder.grams(inputs)

    first = model.block(inputs)
    second = model.block(torch.tanh(first))
    assert [layer.name for layer in layers] == ["block#1", "block#2"]
    assert _kernel_error(grams[0], first) <= 1e-5
    assert _kernel_error(grams[1], second) <= 1e-5


class RecurrentAndDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 5, batch_first=True)
        self.heads = DictHeads()

    def forward(self, x):
        sequence, _ = self.rnn(x)
        return self.heads(sequence[:, -1])["logits"]


class DictHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 2)

    def forward(self, x):
        return {"labels": torch.argmax(x, dim=1), "logits": self.linear(x)}


def test_tuple_and_dict_outputs_use_first_float_tensor():
    model = RecurrentAndDict()
    inputs = torch.randn(4, 7, 3)
    calls = trace_calls(model, inputs[:2])
    layers = select_layers(model, calls, batch_size=2, depth=1, remove_output_layer=False).layers

    with KernelRecorder(model, layers) as recorder:
        grams = recorder.grams(inputs)

    sequence, _ = model.rnn(inputs)
    logits = model.heads.linear(sequence[:, -1])
    assert [layer.name for layer in layers] == ["rnn", "heads"]
    assert _kernel_error(grams[0], sequence) <= 1e-5
    assert _kernel_error(grams[1], logits) <= 1e-5


class IntegerOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.argmax = ArgMax()

    def forward(self, x):
        return self.argmax(self.linear(x))


class ArgMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return torch.argmax(x * self.scale, dim=1)


def test_layer_without_float_output_is_dropped():
    model = IntegerOutput()
    calls = trace_calls(model, torch.randn(2, 3))

    selection = select_layers(model, calls, batch_size=2, depth=-1, remove_output_layer=False)

    assert _names(selection) == ["linear"]
    assert selection.dropped == {"argmax": "output contains no floating-point tensor"}


def test_inplace_relu_does_not_change_recorded_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)  # many outputs become negative
    model.eval()
    inputs = torch.randn(6, 3, 8, 8)
    calls = trace_calls(model, inputs[:2])
    layers = select_layers(model, calls, batch_size=2, depth=-1, remove_output_layer=False).layers

    with KernelRecorder(model, layers) as recorder:
        grams = recorder.grams(inputs)

    with torch.no_grad():
        batchnorm_output = model[1](model[0](inputs))
    assert [layer.name for layer in layers] == ["0", "1"]
    assert (batchnorm_output < 0).any()
    assert _kernel_error(grams[1], batchnorm_output) <= 1e-5
    assert _kernel_error(grams[1], torch.relu(batchnorm_output)) > 1e-2


class ConvolutionThenNorm(nn.Module):
    def __init__(self, norm: nn.Module, between: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.between = between
        self.norm = norm

    def forward(self, x):
        x = self.conv(x)
        if self.between is not None:
            x = self.between(x)
        return self.norm(x)


class CustomNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2.0


def _trained_statistics(norm: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if norm.running_var is not None:
            norm.running_mean.copy_(torch.randn(8, generator=generator))
            norm.running_var.copy_(torch.rand(8, generator=generator) * 3 + 0.1)
        if norm.weight is not None:
            norm.weight.copy_(torch.randn(8, generator=generator))
            norm.bias.copy_(torch.randn(8, generator=generator))
    return norm


@pytest.mark.parametrize(
    "norm, between",
    [
        (nn.BatchNorm2d(8), None),
        (nn.BatchNorm2d(8, affine=False), None),
        (nn.BatchNorm2d(8), nn.ReLU(inplace=True)),
        (nn.BatchNorm2d(8, track_running_stats=False), None),
        (CustomNorm(8), None),
    ],
    ids=["plain", "no-affine", "inplace-relu-between", "batch-statistics", "subclass"],
)
@pytest.mark.parametrize("plain_bytes", [0, None], ids=["plain-products", "shifted-products"])
def test_batchnorm_after_convolution_matches_output(monkeypatch, norm, between, plain_bytes):
    # A BatchNorm that takes a recorded convolution's output unchanged gets its Gram
    # matrix from the convolution's per-channel products; any other must not. Products
    # of large outputs run on them unshifted, which 0 bytes imitates here.
    import cka.kernels

    if plain_bytes is not None:
        monkeypatch.setattr(cka.kernels, "_PLAIN_PRODUCT_BYTES", plain_bytes)
    model = ConvolutionThenNorm(_trained_statistics(norm), between)
    inputs = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = trace_calls(model, inputs[:2])
    selection = select_layers(model, calls, 2, include_parameter_free=True, remove_output_layer=False)
    layers = [layer for layer in selection.layers if layer.name in ("conv", "norm")]

    with KernelRecorder(model, layers) as recorder:
        grams = recorder.grams(inputs)

    with torch.no_grad():
        model.eval()
        convolution = model.conv(inputs)
        norm_output = model.norm(convolution if between is None else between(convolution.clone()))
    assert [layer.name for layer in layers] == ["conv", "norm"]
    for gram, output in zip(grams, (convolution, norm_output)):
        assert _kernel_error(gram, output) <= 1e-5


@pytest.mark.parametrize("plain_bytes", [0, None], ids=["plain-products", "shifted-products"])
@pytest.mark.parametrize("convolution_bias", [0.0, 1000.0], ids=["centered-output", "large-output-mean"])
def test_batchnorm_gram_skips_its_own_product(monkeypatch, plain_bytes, convolution_bias):
    # A large mean makes unshifted per-channel products run again shifted, once for
    # the convolution and its BatchNorm together.
    import cka.kernels
    import models.hooks

    if plain_bytes is not None:
        monkeypatch.setattr(cka.kernels, "_PLAIN_PRODUCT_BYTES", plain_bytes)
    calls = []

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(models.hooks, "linear_gram", counted("linear_gram", models.hooks.linear_gram))
    for name in ("_shifted_product", "_channel_products"):
        monkeypatch.setattr(cka.kernels, name, counted(name, getattr(cka.kernels, name)))
    model = ConvolutionThenNorm(_trained_statistics(nn.BatchNorm2d(8)))
    with torch.no_grad():
        model.conv.bias.fill_(convolution_bias)
        model.norm.running_mean.fill_(convolution_bias)
    inputs = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    layers = select_layers(model, trace_calls(model, inputs[:2]), 2, remove_output_layer=False).layers

    with KernelRecorder(model, layers) as recorder:
        grams = recorder.grams(inputs)

    with torch.no_grad():
        model.eval()
        convolution = model.conv(inputs)
        norm_output = model.norm(convolution)
    recomputed = plain_bytes == 0 and convolution_bias > 0
    assert calls == ["_channel_products"] * (2 if recomputed else 1)
    assert _kernel_error(grams[0], convolution) <= 1e-5
    assert _kernel_error(grams[1], norm_output) <= 1e-5


def _convolution_then_norm(inputs):
    model = ConvolutionThenNorm(_trained_statistics(nn.BatchNorm2d(8)))
    calls = trace_calls(model, inputs[:2])
    return model, select_layers(model, calls, 2, remove_output_layer=False).layers


def test_batchnorm_hook_changed_output():
    inputs = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    model, layers = _convolution_then_norm(inputs)
    model.norm.register_forward_hook(lambda module, args, output: output.clamp(min=0.0))

    with KernelRecorder(model, layers) as recorder:
        grams = recorder.grams(inputs)

    with torch.no_grad():
        model.eval()
        clamped = model(inputs)
        unclamped = model.norm.forward(model.conv(inputs))  # forward() skips the hooks
    assert (unclamped < 0).any()
    assert _kernel_error(grams[1], clamped) <= 1e-5


def test_batchnorm_large_shift_rounded_output():
    # The shift is so large next to the spread that the float32 output is constant over
    # the batch: its centered kernel is zero, so its CKA is NaN, not the exact value.
    inputs = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    model, layers = _convolution_then_norm(inputs)
    with torch.no_grad():
        model.conv.weight.mul_(1e-12)
        model.conv.bias.zero_()
        model.norm.running_mean.zero_()
        model.norm.running_var.fill_(1.0)
        model.norm.weight.fill_(1.0)
        model.norm.bias.fill_(1.0)

    with KernelRecorder(model, layers) as recorder:
        grams = recorder.grams(inputs)

    with torch.no_grad():
        output = model.eval()(inputs)
    assert torch.equal(output, output[:1].expand_as(output))
    assert torch.count_nonzero(grams[1]) == 0
    assert torch.count_nonzero(grams[0]) > 0


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        self.linear(x)
        raise RuntimeError("forward failed")


def test_hooks_removed_and_mode_restored_after_exception():
    model = Failing().train()
    layers = [LayerInfo("linear", "linear", 1, "Linear")]

    with pytest.raises(RuntimeError, match="forward failed"):
        with KernelRecorder(model, layers) as recorder:
            assert not model.training
            recorder.grams(torch.randn(4, 3))

    assert model.training
    assert not model.linear._forward_hooks
    with pytest.raises(RuntimeError, match="forward failed"):
        trace_calls(model, torch.randn(2, 3))
    assert model.training
    assert not model.linear._forward_hooks


def test_union_keeps_execution_order(resnet18):
    model, calls = resnet18
    depth_one = select_layers(model, calls, batch_size=2, depth=1)
    leaves = select_layers(model, calls, batch_size=2, depth=-1)

    union = union_of_layers(calls, [depth_one, leaves])
    names = [layer.name for layer in union]

    assert len(names) == len(set(names)) == 40 + 4
    assert names.index("layer1.1.bn2") < names.index("layer1") < names.index("layer2.0.conv1")
