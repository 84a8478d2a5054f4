"""The command line end to end: small real runs, the files they write, and usage errors."""

import csv
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from main_feat_maps import EXIT_USAGE, main

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL_RUN = ["--dataset", "sample_photos", "--pretrained", "0", "--device", "-1", "--batch_size", "4",
             "--dataloader_size", "2", "--no_progress"]


def _run_subprocess(arguments, tmp_path, **environment):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), **environment}
    return subprocess.run(
        [sys.executable, str(ROOT / "main_feat_maps.py"), *arguments],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )


def _expected_allocator():
    """Return how a CPU run of the command line sets the allocator on this system."""
    from engine.allocator import _environment_settings, _glibc_version

    if sys.platform != "linux" or not _glibc_version().startswith("glibc"):
        return "the C library's defaults"
    if _environment_settings():
        return "set by the environment"
    return "glibc keeps freed memory"


def _read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    return header[1:], [row[0] for row in body], np.array([[float(value) for value in row[1:]] for row in body])


@pytest.fixture(scope="module")
def torchvision_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("torchvision_run")
    output = tmp_path / "out"
    completed = _run_subprocess(
        ["--models_names", "resnet18", "resnet34", "--torchvision", "1", "--compare_all", "1",
         "--layers_depth", "2", "-1", "--input_shape", "32", "--CKA_type", "linear_CKA",
         "--output_path", str(output), *SMALL_RUN],
        tmp_path,
    )
    return completed, output


def test_torchvision_run_succeeds(torchvision_run):
    completed, _ = torchvision_run

    assert completed.returncode == 0, completed.stderr
    assert "CUDA" not in completed.stderr


def test_torchvision_run_writes_every_pair(torchvision_run):
    _, output = torchvision_run

    names = sorted(path.name for path in output.iterdir())

    stems = [f"depth_{depth}_{y}_vs_{x}" for depth in (2, -1)
             for x, y in [("resnet18", "resnet18"), ("resnet18", "resnet34"), ("resnet34", "resnet34")]]
    expected = sorted([f"{stem}.{extension}" for stem in stems for extension in ("png", "csv", "npz")] + ["run_record.json"])
    assert names == expected


def test_self_pair_has_unit_diagonal(torchvision_run):
    _, output = torchvision_run

    columns, rows, matrix = _read_csv(output / "depth_-1_resnet18_vs_resnet18.csv")

    assert rows == columns
    assert len(rows) == 40
    assert np.allclose(np.diag(matrix), 1.0, atol=1e-6)


def test_pair_files_agree(torchvision_run):
    _, output = torchvision_run

    columns, rows, matrix = _read_csv(output / "depth_2_resnet34_vs_resnet18.csv")
    archive = np.load(output / "depth_2_resnet34_vs_resnet18.npz")

    assert rows == ["conv1", "bn1"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert columns[:3] == ["conv1", "bn1", "layer1.0"]
    assert len(columns) == 2 + 3 + 4 + 6 + 3
    assert archive["cka"].shape == (10, 18)
    assert list(archive["rows"]) == rows
    assert list(archive["columns"]) == columns
    assert np.array_equal(archive["cka"], matrix)
    assert str(archive["cka_type"]) == "linear_CKA"


def test_run_record(torchvision_run):
    _, output = torchvision_run

    record = json.loads((output / "run_record.json").read_text())

    assert "--compare_all 1" in record["command"]
    assert record["images"]["count"] == 8
    assert len(record["images"]["indices"]) == 8
    assert record["device"].startswith("cpu")
    assert record["versions"]["torch"]
    assert len(record["pairs"]) == 6
    assert all(pair["nan_cells"] == [] for pair in record["pairs"])
    models = {model["label"]: model for model in record["models"]}
    assert set(models) == {"resnet18", "resnet34"}
    scopes = {scope["depth_requested"]: scope for scope in models["resnet18"]["scopes"]}
    assert scopes[2]["dropped"] == {}
    assert scopes[2]["output_layer_removed"] == "fc"
    assert len(scopes[-1]["layers"]) == 40
    assert "total_s" in record["timings_s"]
    assert record["allocator"].startswith(_expected_allocator())


def test_heatmap_is_a_png(torchvision_run):
    _, output = torchvision_run

    header = (output / "depth_2_resnet34_vs_resnet18.png").read_bytes()[:8]

    assert header == b"\x89PNG\r\n\x1a\n"


def test_pretrainedmodels_run(tmp_path):
    output = tmp_path / "out"

    completed = _run_subprocess(
        ["--models_names", "squeezenet1_1", "--compare_models_names", "bninception",
         "--layers_depth", "1", "--output_path", str(output), *SMALL_RUN],
        tmp_path,
    )

    assert completed.returncode == 0, completed.stderr
    columns, rows, matrix = _read_csv(output / "depth_1_bninception_vs_squeezenet1_1.csv")
    assert rows == ["features"]
    assert len(columns) > 10
    assert np.isfinite(matrix).all()
    record = json.loads((output / "run_record.json").read_text())
    sizes = {model["name"]: model["input_size"] for model in record["models"]}
    assert sizes == {"squeezenet1_1": 224, "bninception": 224}


def test_kernel_cka_self_comparison_in_process(tmp_path):
    output = tmp_path / "out"

    status = main(["--models_names", "resnet18", "--torchvision", "1", "--input_shape", "32",
                   "--layers_depth", "1", "--output_path", str(output), *SMALL_RUN])

    assert status == 0
    archive = np.load(output / "depth_1_resnet18_vs_resnet18.npz")
    assert np.allclose(np.diag(archive["cka"]), 1.0, atol=1e-6)
    assert str(archive["cka_type"]) == "kernel_CKA"


USAGE_ERRORS = [
    pytest.param(["--models_names", "resnet19", "--torchvision", "1"], "did you mean", id="unknown-model"),
    pytest.param(["--models_names", "resnet18", "vgg11", "--torchvision", "1", "--layers_depth", "1", "2", "3"],
                 "--layers_depth got 3 values but the run has 2 pairs", id="list-length"),
    pytest.param(["--models_names", "resnet18", "--torchvision", "1", "--layers_depth", "0"],
                 "--layers_depth 0 is invalid", id="depth-zero"),
    pytest.param(["--models_names", "resnet18", "--torchvision", "1", "--kernel_size", "7", "3", "--conv_only", "1"],
                 "empty range", id="kernel-range"),
    pytest.param(["--models_names", "resnet18", "--torchvision", "1", "--conv_only", "1", "--kernel_size", "5"],
                 r"--conv_only 1 selects no layer of resnet18.*kernel sizes are: 1x1, 3x3, 7x7", id="conv-only-empty"),
    pytest.param(["--models_names", "resnet18", "--torchvision", "1", "--batch_size", "3"],
                 "needs at least 4 images per batch", id="batch-too-small"),
    pytest.param(["--models_names", "resnet18", "--torchvision", "1", "--dataset", "CIFAR11"],
                 "neither a torchvision dataset class, an existing folder of images nor sample_photos", id="dataset-name"),
    pytest.param(["--models_names", "resnet18", "--torchvision", "1", "--dataset", "./no_such_folder"],
                 "no folder of that name exists", id="dataset-folder"),
    pytest.param(["--models_names", "inception_v3", "--torchvision", "1", "--input_shape", "32"],
                 r"inception_v3 rejected a 32x32 input", id="input-size"),
    pytest.param(["--models_names", "resnet18", "--torchvision", "1", "--dataset", "CIFAR10", "--download", "0"],
                 "CIFAR10 is not in", id="dataset-missing"),
    pytest.param(["--models_names", "resnet18", "--torchvision", "1", "--cache_dir", "/proc/cka_cache"],
                 "--cache_dir /proc/cka_cache cannot be written", id="cache-unwritable"),
]


def _with_defaults(arguments):
    defaults = {"--dataset": "sample_photos", "--batch_size": "4", "--dataloader_size": "2"}
    extra = [item for flag, value in defaults.items() if flag not in arguments for item in (flag, value)]
    return [*arguments, *extra, "--pretrained", "0", "--device", "-1", "--no_progress"]


@pytest.mark.parametrize(("arguments", "message"), USAGE_ERRORS)
def test_usage_error_exits_with_message_and_writes_nothing(tmp_path, caplog, arguments, message):
    output = tmp_path / "out"
    arguments = [*arguments, "--output_path", str(output), "--data_root", str(tmp_path / "datasets")]

    status = main(_with_defaults(arguments))

    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert status == EXIT_USAGE
    assert len(errors) == 1
    assert re.search(message, errors[0])
    assert not output.exists()


def test_unwritable_output_folder(caplog):
    status = main(_with_defaults(["--models_names", "resnet18", "--torchvision", "1",
                                  "--output_path", "/proc/cka_output"]))

    assert status == EXIT_USAGE
    assert "--output_path /proc/cka_output cannot be written" in caplog.text
    assert not os.path.exists("/proc/cka_output")


def test_usage_error_from_shell_has_no_traceback(tmp_path):
    output = tmp_path / "out"

    completed = _run_subprocess(
        ["--models_names", "resnet18", "--torchvision", "1", "--layers_depth", "-5",
         "--output_path", str(output), *SMALL_RUN],
        tmp_path,
    )

    assert completed.returncode == EXIT_USAGE
    assert "--layers_depth -5 is invalid" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not output.exists()


def test_missing_weights_name_file_and_cache_folder(tmp_path):
    output = tmp_path / "out"
    arguments = ["--models_names", "resnet18", "--torchvision", "1", "--output_path", str(output),
                 *SMALL_RUN[:2], "--pretrained", "1", *SMALL_RUN[4:]]

    # No network here, and a download that succeeds elsewhere is just as fine.
    completed = _run_subprocess(arguments, tmp_path)

    if completed.returncode == 0:
        pytest.skip("the weights could be downloaded")
    assert completed.returncode == EXIT_USAGE
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert "resnet18-f37072fd.pth" in completed.stderr
    assert str(checkpoints) in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not output.exists()
