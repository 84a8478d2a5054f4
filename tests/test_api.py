"""The Python API: compare_models on any modules, and timm models from the command line."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cka import minibatch_cka
from engine import compare_models
from main_feat_maps import main


def _tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


def _loader(count: int = 24, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(count, 6, generator=generator)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size)


def test_matrix_matches_one_pair_at_a_time():
    model_x, model_y = _tiny(0), _tiny(1)
    loader = _loader()

    comparison = compare_models(model_x, model_y, loader, include_parameter_free=True)

    assert comparison.rows == ["0", "1", "2", "3", "4"]
    assert comparison.examples == 24
    with torch.no_grad():
        for row, prefix_x in enumerate(range(1, 6)):
            for column, prefix_y in enumerate(range(1, 6)):
                features_x = [model_x[:prefix_x](inputs) for inputs, _ in loader]
                features_y = [model_y[:prefix_y](inputs) for inputs, _ in loader]
                expected = minibatch_cka(features_x, features_y)
                assert float(comparison.matrix[row, column]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_named_layers_and_list_of_tensors():
    model = _tiny(0)
    batches = [torch.randn(8, 6) for _ in range(2)]

    comparison = compare_models(model, model, batches, layers_x=["0", "4"], layers_y=["2"])

    assert comparison.rows == ["0", "4"]
    assert comparison.columns == ["2"]
    assert comparison.matrix.shape == (2, 1)


def test_unknown_layer_name_suggests_close_names():
    model = _tiny(0)

    with pytest.raises(ValueError, match=r"Sequential has no module named '5'"):
        compare_models(model, model, [torch.randn(8, 6)], layers_x=["5"])


def test_batch_too_small_for_estimator():
    model = _tiny(0)

    with pytest.raises(ValueError, match="needs at least 4 examples per batch, got 3"):
        compare_models(model, model, [torch.randn(3, 6)])


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError("third call fails")
        return self.linear(x)


def _hook_count(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def test_hooks_removed_and_mode_restored_after_success():
    model_x, model_y = _tiny(0).train(), _tiny(1).eval()

    compare_models(model_x, model_y, _loader())

    assert model_x.training
    assert not model_y.training
    assert _hook_count(model_x) == _hook_count(model_y) == 0


def test_hooks_removed_and_mode_restored_after_exception():
    failing, other = Exploding().train(), _tiny(1).train()

    with pytest.raises(RuntimeError, match="third call fails"):
        compare_models(failing, other, [torch.randn(8, 6) for _ in range(3)])

    assert failing.training
    assert other.training
    assert _hook_count(failing) == _hook_count(other) == 0


def test_plot_and_save(tmp_path):
    model = _tiny(0)
    comparison = compare_models(model, model, _loader(), name_x="tiny", name_y="tiny")

    figure = comparison.plot()
    paths = comparison.save(str(tmp_path))

    assert figure.axes[0].get_title().startswith("tiny vs tiny")
    assert [path.rsplit(".", 1)[1] for path in paths] == ["png", "csv", "npz"]
    archive = np.load(paths[2])
    assert np.allclose(np.diag(archive["cka"]), 1.0)
    assert list(archive["rows"]) == comparison.rows


def test_timm_models_from_command_line(tmp_path):
    output = tmp_path / "out"

    status = main([
        "--models_names", "resnet18", "--compare_models_names", "mobilenetv3_small_050",
        "--library", "timm", "--pretrained", "0", "--dataset", "sample_photos",
        "--batch_size", "4", "--dataloader_size", "2", "--input_shape", "32",
        "--layers_depth", "1", "--device", "-1", "--no_progress", "--output_path", str(output),
    ])

    assert status == 0
    archive = np.load(output / "depth_1_mobilenetv3_small_050_vs_resnet18.npz")
    assert list(archive["rows"])[:2] == ["conv1", "bn1"]
    assert np.isfinite(archive["cka"]).all()


def test_frozen_submodule_stays_frozen():
    model = _tiny(0).train()
    model[0].eval()

    compare_models(model, model, _loader())

    assert model.training
    assert not model[0].training
    assert model[2].training
