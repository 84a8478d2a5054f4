"""Channels-last models on the CPU: the same Gram matrices and CKA as channels first."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import engine.run
from cka.kernels import _flatten, channel_grams, linear_gram
from main_feat_maps import main
from models import KernelRecorder, prefers_channels_last, select_layers, trace_calls


def _channels_last(features: torch.Tensor) -> torch.Tensor:
    return features.contiguous(memory_format=torch.channels_last)


def test_flattening_channels_last_makes_no_copy():
    features = _channels_last(torch.randn(4, 6, 5, 3))

    flat = _flatten(features)

    assert flat.shape == (4, 90)
    assert flat.data_ptr() == features.data_ptr()


def test_flattening_keeps_examples_apart():
    # Examples last in memory: the rows must still be the examples.
    features = torch.randn(3, 5, 4).permute(2, 0, 1)

    assert torch.allclose(linear_gram(features), linear_gram(features.contiguous()), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["centered", "offset"])
def test_channels_last_gram_matches(offset):
    features = offset + torch.randn(8, 16, 12, 12, generator=torch.Generator().manual_seed(3))

    first = linear_gram(features).double()
    last = linear_gram(_channels_last(features)).double()

    assert torch.allclose(last, first, rtol=1e-5, atol=1e-5 * first.abs().max().item())


def test_channels_last_channel_grams_match():
    features = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(5)) + 1.0

    grams_first, gram_first = channel_grams(features)
    grams_last, gram_last = channel_grams(_channels_last(features))

    assert torch.allclose(grams_last, grams_first, rtol=1e-6, atol=1e-5)
    assert torch.allclose(gram_last, gram_first, rtol=1e-6, atol=1e-4)


class _Stem(nn.Module):
    """Two convolutions, a BatchNorm and an in-place ReLU, as a ResNet starts."""

    def __init__(self, flatten_by_view: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 5)
        self.flatten_by_view = flatten_by_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        # view needs a channels-first layout here, while flatten works with either.
        return self.fc(x.view(x.shape[0], -1) if self.flatten_by_view else torch.flatten(x, 1))


def _stem(flatten_by_view: bool = False) -> _Stem:
    torch.manual_seed(0)
    model = _Stem(flatten_by_view).eval()
    with torch.no_grad():
        # Scales and shifts that differ per channel, and a mean well above zero.
        model.bn1.running_mean.uniform_(-1.0, 1.0)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 2.0)
        model.bn1.bias.uniform_(1.0, 3.0)
    return model


def test_channels_last_preference():
    patch_embedding = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2))
    with_volume = nn.Sequential(_stem(), nn.Conv3d(1, 2, 3))

    assert prefers_channels_last(_stem(), "cpu")
    assert not prefers_channels_last(_stem(), "cuda")
    assert not prefers_channels_last(patch_embedding, "cpu")
    assert not prefers_channels_last(with_volume, "cpu")


def _stem_grams(images: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, list[str]]:
    model = _stem()
    layers = select_layers(model, trace_calls(model, images), batch_size=len(images), depth=-1).layers
    if channels_last:
        model.to(memory_format=torch.channels_last)
        images = _channels_last(images)
    with KernelRecorder(model, layers) as recorder:
        grams = recorder.grams(images)
    return grams, [layer.module_name for layer in layers]


IMAGES = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def test_recorder_channels_last_matches_first():
    first, _ = _stem_grams(IMAGES, channels_last=False)
    last, names = _stem_grams(IMAGES, channels_last=True)

    assert names == ["conv1", "bn1", "conv2"]
    assert torch.allclose(last, first, rtol=1e-5, atol=1e-4)


def test_recorder_reads_batchnorm_before_relu():
    grams, names = _stem_grams(IMAGES, channels_last=True)
    model = _stem().to(memory_format=torch.channels_last)
    outputs = {}
    model.bn1.register_forward_hook(lambda module, args, output: outputs.__setitem__("bn1", output.clone()))
    with torch.no_grad():
        model(_channels_last(IMAGES))
    # Centered outputs as the BatchNorm returned them, before the in-place ReLU.
    bn1 = outputs["bn1"].double().reshape(len(IMAGES), -1)
    bn1 = bn1 - bn1.mean(dim=0)
    centering = torch.eye(len(IMAGES), dtype=torch.float64) - 1.0 / len(IMAGES)

    recorded = centering @ grams[names.index("bn1")].double() @ centering

    assert torch.allclose(recorded, bn1 @ bn1.T, rtol=1e-5, atol=1e-3)


SMALL = [
    "--torchvision", "1", "--pretrained", "0", "--dataset", "sample_photos", "--device", "-1",
    "--no_progress", "--models_names", "resnet18", "--input_shape", "32", "--batch_size", "4",
    "--dataloader_size", "2", "--layers_depth", "-1",
]


def _run(tmp_path, name, *, build=None, cache=False):
    output = tmp_path / name
    arguments = ["--cache_dir", str(tmp_path / "cache")] if cache else ["--cache", "0"]
    assert main([*SMALL, "--output_path", str(output), *arguments]) == 0
    record = json.loads((output / "run_record.json").read_text())
    matrices = {path.name: np.load(path)["cka"] for path in sorted(output.glob("*.npz"))}
    return matrices, [model["memory_layout"] for model in record["models"]]


def _is_channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last)


def _first_layout_recorded(monkeypatch, layouts: list[tuple[bool, bool, bool]]) -> None:
    """Build models whose first convolution records, at each call, which tensors are channels last.

    Each record is ``(input, weight, output)``. A convolution returns channels last when
    either its input or its weight is, so the output alone does not show both.
    """
    build = engine.run.build_model

    def record(module, args, output):
        layouts.append((_is_channels_last(args[0]), _is_channels_last(module.weight), _is_channels_last(output)))

    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        first = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
        first.register_forward_hook(record)
        return model

    monkeypatch.setattr(engine.run, "build_model", recording_build)


def test_cpu_run_is_channels_last(tmp_path, monkeypatch):
    layouts = []
    _first_layout_recorded(monkeypatch, layouts)

    _, layout = _run(tmp_path, "run")

    assert layout == ["channels last"]
    # The trace, then one call per batch.
    assert layouts == [(True, True, True)] * 3


def test_cli_layouts_agree(tmp_path, monkeypatch):
    last, last_layout = _run(tmp_path, "last")
    monkeypatch.setattr(engine.run, "prefers_channels_last", lambda module, device: False)
    first, first_layout = _run(tmp_path, "first")

    assert last_layout == ["channels last"]
    assert first_layout == ["channels first"]
    assert last.keys() == first.keys()
    for name, matrix in last.items():
        assert np.allclose(matrix, first[name], rtol=0, atol=1e-5, equal_nan=True)


def test_cached_trace_keeps_channels_last(tmp_path, monkeypatch):
    layouts = []
    _first_layout_recorded(monkeypatch, layouts)
    first, _ = _run(tmp_path, "first", cache=True)
    # Without its kernels, the model runs again from the cached trace.
    for path in (tmp_path / "cache").rglob("batch*.npz"):
        path.unlink()
    layouts.clear()

    second, layout = _run(tmp_path, "second", cache=True)

    assert layout == ["channels last"]
    assert layouts == [(True, True, True)] * 2
    for name, matrix in first.items():
        assert np.array_equal(matrix, second[name], equal_nan=True)


def test_view_model_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(engine.run, "build_model", lambda *args, **kwargs: _stem(flatten_by_view=True))
    viewing, layout = _run(tmp_path, "view", cache=True)
    for path in (tmp_path / "cache").rglob("batch*.npz"):
        path.unlink()
    cached, cached_layout = _run(tmp_path, "cached", cache=True)
    monkeypatch.setattr(engine.run, "prefers_channels_last", lambda module, device: False)
    plain, _ = _run(tmp_path, "plain")

    assert layout == ["channels first"]
    assert cached_layout == ["channels first"]
    for name, matrix in viewing.items():
        assert np.array_equal(matrix, plain[name], equal_nan=True)
        assert np.array_equal(matrix, cached[name], equal_nan=True)
