"""Expanding options into pairs, and the usage errors found before any model is built."""

import pytest

from engine import RunOptions, UsageError, build_plan
from models import ModelLoadError


def _plan(tmp_path, **overrides):
    options = {
        "models_names": ["resnet18"],
        "torchvision": 1,
        "device": -1,
        "output_path": str(tmp_path / "out"),
        "batch_size": 4,
    }
    options.update(overrides)
    return build_plan(RunOptions(**options))


def _pairs(plan):
    return [(task.model_x.name, task.model_y.name, task.depth) for task in plan.tasks]


def test_models_compared_with_themselves_by_default(tmp_path):
    plan = _plan(tmp_path, models_names=["resnet18", "vgg11"])

    assert _pairs(plan) == [("resnet18", "resnet18", -1), ("vgg11", "vgg11", -1)]


def test_compare_models_names_pairs_by_position(tmp_path):
    plan = _plan(tmp_path, models_names=["resnet18", "vgg11"], compare_models_names=["resnet34", "alexnet"])

    assert _pairs(plan) == [("resnet18", "resnet34", -1), ("vgg11", "alexnet", -1)]


def test_compare_all_gives_pairs_and_self_pairs_at_every_depth(tmp_path):
    plan = _plan(tmp_path, models_names=["resnet18", "resnet34", "vgg11"], compare_all=1, layers_depth=[-1, 2])

    pairs = _pairs(plan)

    # 3 choose 2 pairs plus 3 self-pairs, each at 2 depths.
    assert len(pairs) == 12
    assert {(x, y) for x, y, _ in pairs} == {
        ("resnet18", "resnet18"), ("resnet18", "resnet34"), ("resnet18", "vgg11"),
        ("resnet34", "resnet34"), ("resnet34", "vgg11"), ("vgg11", "vgg11"),
    }
    assert {depth for _, _, depth in pairs} == {-1, 2}
    assert len(plan.models) == 3


def test_compare_all_ignores_compare_models_names(tmp_path, caplog):
    plan = _plan(tmp_path, models_names=["resnet18", "vgg11"], compare_models_names=["alexnet", "alexnet"], compare_all=1)

    assert "alexnet" not in {name for pair in _pairs(plan) for name in pair[:2]}
    assert "--compare_models_names is ignored" in caplog.text


def test_one_value_broadcasts_and_lists_apply_in_order(tmp_path):
    plan = _plan(
        tmp_path,
        models_names=["resnet18", "vgg11"],
        layers_depth=[2, 1],
        CKA_type=["linear_CKA"],
        input_shape=[64, 96],
    )

    assert [task.depth for task in plan.tasks] == [2, 1]
    assert [task.cka_type for task in plan.tasks] == ["linear_CKA", "linear_CKA"]
    assert [task.kernel.kernel for task in plan.tasks] == ["linear", "linear"]
    assert [task.model_x.input_size for task in plan.tasks] == [64, 96]


@pytest.mark.parametrize(
    ("flag", "values"),
    [("pretrained", [1, 0, 1]), ("input_shape", [32, 64, 96]), ("CKA_type", ["linear_CKA"] * 3), ("layers_depth", [1, 2, 3])],
)
def test_wrong_list_length_names_flag_and_lengths(tmp_path, flag, values):
    with pytest.raises(UsageError, match=rf"--{flag} got 3 values but the run has 2 pairs; give 1 value .* or 2 values"):
        _plan(tmp_path, models_names=["resnet18", "vgg11"], **{flag: values})


def test_compare_all_accepts_any_number_of_depths(tmp_path):
    plan = _plan(tmp_path, models_names=["resnet18", "vgg11"], compare_all=1, layers_depth=[1, 2, 3, -1])

    assert len(plan.tasks) == 3 * 4


def test_compare_pretrained_gives_distinct_labels(tmp_path):
    plan = _plan(tmp_path, pretrained=[1], compare_pretrained=[0])

    task = plan.tasks[0]
    assert (task.model_x.pretrained, task.model_y.pretrained) == (True, False)
    assert (task.model_x.label, task.model_y.label) == ("resnet18-pretrained", "resnet18-random")
    assert task.stem == "depth_-1_resnet18-random_vs_resnet18-pretrained"


def test_repeated_pairs_run_once_and_stems_differ(tmp_path, caplog):
    plan = _plan(
        tmp_path,
        models_names=["resnet18", "resnet18", "resnet18"],
        CKA_type=["linear_CKA", "kernel_CKA", "linear_CKA"],
    )

    stems = [task.stem for task in plan.tasks]
    assert stems == ["depth_-1_resnet18_vs_resnet18_linear_CKA", "depth_-1_resnet18_vs_resnet18_kernel_CKA"]
    assert "1 repeated pair(s) are computed once" in caplog.text


def test_weights_with_same_file_name_get_distinct_labels(tmp_path):
    paths = []
    for folder in ("run_a", "run_b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "best.pt").write_bytes(b"")
        paths.append(str(tmp_path / folder / "best.pt"))

    plan = _plan(tmp_path, models_names=["resnet18", "resnet18"], weights=paths, compare_all=1)

    labels = [(task.model_x.label, task.model_y.label) for task in plan.tasks]
    assert labels == [
        ("resnet18-best-run_a", "resnet18-best-run_a"),
        ("resnet18-best-run_a", "resnet18-best-run_b"),
        ("resnet18-best-run_b", "resnet18-best-run_b"),
    ]
    assert len({task.stem for task in plan.tasks}) == 3
    assert not any(task.stem.endswith("CKA") for task in plan.tasks)


def test_conv_only_ignores_depth_with_warning(tmp_path, caplog):
    plan = _plan(tmp_path, conv_only=1, layers_depth=[2])

    assert plan.tasks[0].conv_only
    assert plan.tasks[0].stem == "conv_only_resnet18_vs_resnet18"
    assert "--layers_depth is ignored with --conv_only 1" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layers_depth": [0]}, "--layers_depth 0 is invalid"),
        ({"layers_depth": [-2]}, "--layers_depth -2 is invalid"),
        ({"conv_only": 1, "kernel_size": [5, 3]}, r"--kernel_size 5 3 is an empty range.*--kernel_size 3 5"),
        ({"conv_only": 1, "kernel_size": [1, 3, 5]}, "--kernel_size takes 1 value .* or 2 .*, got 3"),
        ({"conv_only": 1, "kernel_size": [0]}, "--kernel_size values must be at least 1"),
        ({"seed": -1}, r"--seed must be between 0 and 2\*\*63 - 1, got -1"),
        ({"rbf_sigma": float("inf")}, "--rbf_sigma must be a positive finite number, got inf"),
        ({"batch_size": 2, "hsic": "biased"}, "--batch_size 2 is too small for kernel_CKA"),
        ({"output_path": ""}, "--output_path is empty"),
        ({"output_path": "/proc/cka_output"}, r"--output_path /proc/cka_output cannot be written"),
        ({"batch_size": 3}, "--batch_size 3 is too small: the unbiased HSIC estimator needs at least 4"),
        ({"batch_size": 1, "hsic": "biased"}, "the biased HSIC estimator needs at least 2"),
        ({"dataloader_size": 0}, "--dataloader_size must be at least 1"),
        ({"pretrained": [2]}, "--pretrained must be 0 or 1, got 2"),
        ({"compare_all": 5}, "--compare_all must be 0 or 1, got 5"),
        ({"input_shape": [0]}, "--input_shape must be a positive number of pixels"),
        ({"rbf_sigma": 0.0}, "--rbf_sigma must be a positive finite number"),
        ({"device": -3}, "--device must be -1"),
        ({"compare_models_names": ["vgg11", "alexnet"]}, "--compare_models_names got 2 names for 1"),
        ({"layers_depth": [1, 2]}, r"got 2 values but the run has 1 pair; give 1 value\. .* add --compare_all 1"),
        ({"CKA_type": ["kernel_CKA", "linear_CKA"]}, r"got 2 values but the run has 1 pair; give 1 value\.$"),
        ({"models_names": []}, "--models_names needs at least one model name"),
    ],
)
def test_usage_errors(tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message):
        _plan(tmp_path, **overrides)


def test_kernel_size_ignored_without_conv_only(tmp_path):
    plan = _plan(tmp_path, kernel_size=[5, 3])

    assert plan.kernel_range == (3, 100)


def test_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))

    plan = _plan(tmp_path, output_path="~/results")

    assert plan.options.output_path == str(tmp_path / "results")


def test_unknown_model_suggests_close_names(tmp_path):
    with pytest.raises(ModelLoadError, match=r"unknown torchvision model 'resnet19'.*did you mean .*resnet18"):
        _plan(tmp_path, models_names=["resnet19"])


def test_model_of_other_library_names_the_flag(tmp_path):
    with pytest.raises(ModelLoadError, match=r"unknown pretrainedmodels model 'convnext_tiny'.*add --torchvision 1"):
        _plan(tmp_path, models_names=["convnext_tiny"], torchvision=0)


def test_output_path_that_is_a_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("")

    with pytest.raises(UsageError, match="is a file, not a folder"):
        _plan(tmp_path, output_path=str(path))


def test_plan_creates_no_output_folder(tmp_path):
    _plan(tmp_path)

    assert not (tmp_path / "out").exists()


def test_pretrainedmodels_use_their_own_input_size(tmp_path):
    plan = _plan(tmp_path, models_names=["inceptionv4", "resnet18"], torchvision=0)

    assert [task.model_x.input_size for task in plan.tasks] == [299, 224]
