"""Failures users of other CKA tools report, each on a small model with its right value.

Layer order, repeated calls, tuple and dict outputs and in-place activations are tested
at the hook level in test_layers.py; this file goes through the whole engine.
"""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from cka import minibatch_cka
from data import Normalizer, open_images, resized_batches
from engine import RunOptions, build_plan, compare_models, run_plan
from main_feat_maps import EXIT_USAGE, main
from models import build_model, input_spec


class Offset(nn.Module):
    def __init__(self, offset: float):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(offset))

    def forward(self, x):
        return x + self.offset


def _offset_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 64), nn.Tanh(), Offset(100.0), nn.Linear(64, 32), Offset(100.0))


def _batches(count: int = 3, size: int = 16, width: int = 10) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(size, width, generator=generator) for _ in range(count)]


def _float64_reference(model_x, model_y, batches, row_end, column_end, **settings):
    double_x, double_y = model_x.double(), model_y.double()
    with torch.no_grad():
        features_x = [double_x[:row_end](x.double()) for x in batches]
        features_y = [double_y[:column_end](x.double()) for x in batches]
    return minibatch_cka(features_x, features_y, **settings)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_large_mean_in_float32_matches_float64(kernel):
    model_x, model_y = _offset_model(0), _offset_model(1)
    batches = _batches()

    comparison = compare_models(model_x, model_y, batches, layers_x=["2"], layers_y=["4"], kernel=kernel)

    value = float(comparison.matrix[0, 0])
    expected = _float64_reference(_offset_model(0), _offset_model(1), batches, 3, 5, kernel=kernel)
    assert math.isfinite(value)
    assert value == pytest.approx(expected, abs=1e-5)
    assert value > 0.1


class ConstantBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(10, 8)
        self.dead = nn.Linear(10, 8)
        with torch.no_grad():
            self.dead.weight.zero_()
            self.dead.bias.fill_(0.3)

    def forward(self, x):
        return self.features(x) + 0 * self.dead(x)


def test_constant_layer_gives_nan_row_marked_in_heatmap_and_log(caplog):
    model = ConstantBranch()

    comparison = compare_models(model, model, _batches(), name_x="branchy", name_y="branchy")

    assert comparison.rows == ["features", "dead"]
    assert torch.isnan(comparison.matrix[1]).all()
    assert torch.isnan(comparison.matrix[:, 1]).all()
    assert float(comparison.matrix[0, 0]) == pytest.approx(1.0)
    assert "branchy: 1 layer(s) have undefined CKA" in caplog.text
    assert "dead" in caplog.text
    label = comparison.plot().axes[1].get_ylabel()
    assert "grey: 3 undefined cells" in label


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(10, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x)


def test_small_batches_rejected_before_any_forward_pass(tmp_path, caplog):
    model = Counting()

    with pytest.raises(ValueError, match="needs at least 4 examples per batch, got 3"):
        compare_models(model, model, _batches(size=3))
    status = main(["--models_names", "resnet18", "--torchvision", "1", "--pretrained", "0",
                   "--dataset", "sample_photos", "--batch_size", "3", "--device", "-1",
                   "--output_path", str(tmp_path / "out")])

    assert model.calls == 0
    assert status == EXIT_USAGE
    assert "--batch_size 3 is too small" in caplog.text


def test_models_with_different_input_sizes_see_the_same_images(tmp_path):
    options = RunOptions(models_names=["resnet18"], compare_models_names=["inceptionv4"], pretrained=[0],
                         dataset="sample_photos", batch_size=4, dataloader_size=2, layers_depth=[1],
                         CKA_type=["linear_CKA"], device=-1, output_path=str(tmp_path))

    result = run_plan(build_plan(options), progress=False)

    pair = result.pairs[0]
    assert [model.spec.input_size for model in result.models] == [224, 299]
    images = open_images("sample_photos", 8, seed=0)
    features = {}
    for name, size, layer in (("resnet18", 224, "conv1"), ("inceptionv4", 299, "features")):
        model = build_model("pretrainedmodels", name, pretrained=False, size=size, seed=0)
        spec = input_spec("pretrainedmodels", name, size)
        normalizer = Normalizer(spec.mean, spec.std, spec.value_range, spec.color_space)
        with torch.no_grad():
            features[name] = [getattr(model, layer)(normalizer(pixels)) for pixels in resized_batches(images, size, 4)]
    expected = minibatch_cka(features["resnet18"], features["inceptionv4"])
    assert pair.rows[0] == "conv1"
    assert pair.columns == ["features"]
    assert float(pair.matrix[0, 0]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations_are_upcast(dtype):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
    batches = [batch * 30.0 for batch in _batches(size=32)]
    reference = compare_models(model, model, batches, include_parameter_free=True)

    low = copy.deepcopy(model).to(dtype)
    comparison = compare_models(low, low, [batch.to(dtype) for batch in batches], include_parameter_free=True)

    values = comparison.matrix.numpy()
    assert np.isfinite(values).all()
    assert np.allclose(np.diag(values), 1.0, atol=1e-6)
    assert np.allclose(values, reference.matrix.numpy(), atol=0.02)
