"""The whole engine against an independent float64 computation on real models."""

import numpy as np
import pytest
import torch

from data import Normalizer, open_images, resized_batches
from engine import RunOptions, build_plan, run_plan
from models import build_model, input_spec


def _unbiased_hsic(kernel_x: np.ndarray, kernel_y: np.ndarray) -> float:
    """Song et al. (2012), equation (5), in float64."""
    n = kernel_x.shape[0]
    k = kernel_x - np.diag(np.diag(kernel_x))
    l = kernel_y - np.diag(np.diag(kernel_y))
    ones = np.ones(n)
    return (
        np.trace(k @ l)
        + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (ones @ k @ l @ ones)
    ) / (n * (n - 3))


def _reference_kernels(model_name: str, size: int, layer_names: list[str], images, batch_size: int):
    """Linear kernels per batch and layer from outputs cloned inside plain hooks.

    Cloning inside the hook keeps each output as it was returned, before a later
    in-place ReLU changes it.
    """
    model = build_model("torchvision", model_name, pretrained=False, size=size, seed=0)
    spec = input_spec("torchvision", model_name, size)
    normalizer = Normalizer(spec.mean, spec.std)
    modules = dict(model.named_modules())
    captured = {}
    handles = [
        modules[name].register_forward_hook(
            lambda module, args, output, name=name: captured.__setitem__(name, output.detach().clone())
        )
        for name in layer_names
    ]
    kernels = []
    try:
        with torch.no_grad():
            for pixels in resized_batches(images, size, batch_size):
                inputs = normalizer(pixels)
                model(inputs)
                batch = []
                for name in layer_names:
                    features = captured[name].reshape(len(inputs), -1).double().numpy()
                    features = features - features.mean(axis=0)
                    batch.append(features @ features.T)
                kernels.append(batch)
    finally:
        for handle in handles:
            handle.remove()
    return kernels


def _minibatch_cka(kernels_x, kernels_y, row: int, column: int) -> float:
    cross = sum(_unbiased_hsic(kx[row], ky[column]) for kx, ky in zip(kernels_x, kernels_y))
    self_x = sum(_unbiased_hsic(kx[row], kx[row]) for kx in kernels_x)
    self_y = sum(_unbiased_hsic(ky[column], ky[column]) for ky in kernels_y)
    return cross / np.sqrt(self_x * self_y)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(False, id="shifted-products-images-inline"),
        pytest.param(True, id="plain-products-images-prefetched"),
    ],
)
def resnet_pair(request, tmp_path_factory):
    # Products of outputs from 256 KiB run on them unshifted. Machines with spare
    # processors prepare images in a thread. The second run takes both paths here.
    import cka.kernels
    import engine.run

    options = RunOptions(
        models_names=["resnet18"],
        compare_models_names=["resnet34"],
        torchvision=1,
        pretrained=[0],
        dataset="sample_photos",
        batch_size=6,
        dataloader_size=2,
        input_shape=[32],
        CKA_type=["linear_CKA"],
        device=-1,
        output_path=str(tmp_path_factory.mktemp("engine")),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.run, "_idle_processor_for", lambda device: request.param)
        if request.param:
            patch.setattr(cka.kernels, "_PLAIN_PRODUCT_BYTES", 0)
        result = run_plan(build_plan(options), progress=False)
    return options, result


def test_engine_matches_float64_reference(resnet_pair):
    options, result = resnet_pair
    pair = result.pairs[0]
    images = open_images("sample_photos", 12, seed=0)
    kernels_x = _reference_kernels("resnet18", 32, pair.rows, images, 6)
    kernels_y = _reference_kernels("resnet34", 32, pair.columns, images, 6)

    # Every BatchNorm row against a spread of columns: each BatchNorm of a ResNet block
    # is followed by an in-place ReLU, the trap that changes outputs read too late.
    batchnorm_rows = [index for index, name in enumerate(pair.rows) if ".bn" in name]
    columns = list(range(0, len(pair.columns), 7))
    for row in batchnorm_rows:
        for column in columns:
            expected = _minibatch_cka(kernels_x, kernels_y, row, column)
            assert float(pair.matrix[row, column]) == pytest.approx(expected, abs=1e-6), (
                pair.rows[row], pair.columns[column]
            )


def test_engine_axes_in_execution_order(resnet_pair):
    _, result = resnet_pair
    pair = result.pairs[0]

    assert pair.matrix.shape == (40, 72)
    assert pair.rows[:3] == ["conv1", "bn1", "layer1.0.conv1"]
    assert pair.columns.index("layer2.0.bn2") < pair.columns.index("layer2.0.downsample.0")


def test_different_input_sizes_see_the_same_images(tmp_path):
    options = RunOptions(
        models_names=["resnet18", "resnet18"],
        torchvision=1,
        pretrained=[0],
        dataset="sample_photos",
        batch_size=4,
        dataloader_size=2,
        input_shape=[32, 48],
        layers_depth=[1],
        CKA_type=["linear_CKA"],
        device=-1,
        output_path=str(tmp_path),
    )

    result = run_plan(build_plan(options), progress=False)

    small, large = result.models
    assert (small.spec.input_size, large.spec.input_size) == (32, 48)
    assert [pair.task.stem for pair in result.pairs] == [
        "depth_1_resnet18-32px_vs_resnet18-32px",
        "depth_1_resnet18-48px_vs_resnet18-48px",
    ]
