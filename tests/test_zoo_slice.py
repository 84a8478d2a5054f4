"""A representative slice of both model zoos: each model runs and compares to itself.

The full sweep over every model is ``bench/zoo_sweep.py``. This slice keeps the awkward
cases in CI: an auxiliary head that never runs in eval mode (inception_v3, googlenet),
attention projections used only through their weights (vit_b_16), ModuleLists that never
run (convnext_tiny), hundreds of layers (densenet121, nasnetamobile), BGR input in 0..255
(bninception) and a 299-pixel input (inceptionv4).
"""

import numpy as np
import pytest

from engine import RunOptions, build_plan, run_plan

SLICE = [
    ("torchvision", "resnet18", 32),
    ("torchvision", "inception_v3", 75),
    ("torchvision", "vit_b_16", 32),
    ("torchvision", "convnext_tiny", 32),
    ("torchvision", "mobilenet_v3_small", 32),
    ("torchvision", "densenet121", 32),
    ("torchvision", "squeezenet1_1", 32),
    ("pretrainedmodels", "bninception", 224),
    ("pretrainedmodels", "nasnetamobile", 224),
    ("pretrainedmodels", "inceptionv4", 299),
]


@pytest.mark.parametrize(("library", "name", "size"), SLICE, ids=[name for _, name, _ in SLICE])
def test_self_comparison_has_unit_diagonal(tmp_path, library, name, size):
    options = RunOptions(
        models_names=[name],
        compare_all=1,
        library=library,
        pretrained=[0],
        dataset="sample_photos",
        batch_size=4,
        dataloader_size=2,
        input_shape=[size],
        layers_depth=[-1, 1],
        CKA_type=["linear_CKA"],
        device=-1,
        output_path=str(tmp_path),
    )

    result = run_plan(build_plan(options), progress=False)

    assert [pair.task.depth for pair in result.pairs] == [-1, 1]
    assert result.models[0].spec.input_size == size
    for pair in result.pairs:
        diagonal = np.diag(pair.matrix.numpy())
        assert len(diagonal) == len(pair.rows) > 0
        assert np.all(np.abs(diagonal - 1.0) < 1e-5), (pair.rows, diagonal)


def _dropped(result, depth):
    scope = result.models[0].selections[(depth, False)]
    return scope.dropped


def test_inception_auxiliary_head_is_dropped(tmp_path):
    options = RunOptions(models_names=["inception_v3"], library="torchvision", pretrained=[0],
                         dataset="sample_photos", batch_size=4, dataloader_size=1, input_shape=[75],
                         layers_depth=[1], device=-1, output_path=str(tmp_path))

    result = run_plan(build_plan(options), progress=False)

    assert _dropped(result, 1)["AuxLogits"] == "never ran during the forward pass"
    assert "AuxLogits" not in result.pairs[0].rows


def test_vit_attention_projection_is_dropped(tmp_path):
    options = RunOptions(models_names=["vit_b_16"], library="torchvision", pretrained=[0],
                         dataset="sample_photos", batch_size=4, dataloader_size=1, input_shape=[32],
                         device=-1, output_path=str(tmp_path))

    result = run_plan(build_plan(options), progress=False)

    dropped = _dropped(result, -1)
    projection = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    assert dropped[projection] == "never ran during the forward pass"
    assert "encoder.layers.encoder_layer_0.mlp.0" in result.pairs[0].rows
