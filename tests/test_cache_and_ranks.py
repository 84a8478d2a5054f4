"""The kernel cache, resuming after a kill, and splitting batches among torchrun ranks."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from main_feat_maps import EXIT_INTERRUPTED, main

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = ["--torchvision", "1", "--pretrained", "0", "--dataset", "sample_photos", "--device", "-1",
        "--no_progress", "--CKA_type", "linear_CKA"]


def _run(tmp_path, name, *arguments):
    output = tmp_path / name
    status = main([*BASE, "--output_path", str(output), "--cache_dir", str(tmp_path / "cache"), *arguments])
    assert status == 0
    record = json.loads((output / "run_record.json").read_text())
    return output, {model["label"]: model["batches_from_cache"] for model in record["models"]}


def _matrices(output):
    return {path.name: np.load(path)["cka"] for path in sorted(output.glob("*.npz"))}


SMALL = ["--models_names", "resnet18", "--input_shape", "32", "--batch_size", "4", "--dataloader_size", "2",
         "--layers_depth", "1"]


def test_rerun_reads_every_batch_from_cache(tmp_path):
    first, cached_first = _run(tmp_path, "first", *SMALL)
    second, cached_second = _run(tmp_path, "second", *SMALL)

    assert cached_first == {"resnet18": []}
    assert cached_second == {"resnet18": [0, 1]}
    for name, matrix in _matrices(first).items():
        assert np.array_equal(matrix, _matrices(second)[name])


@pytest.mark.parametrize(
    "change",
    [
        ["--seed", "1"],
        ["--input_shape", "40"],
        ["--batch_size", "5"],
        ["--dataset", "FOLDER"],
    ],
    ids=["seed", "input-size", "batch-size", "images"],
)
def test_changing_a_key_input_recomputes(tmp_path, change):
    if change == ["--dataset", "FOLDER"]:
        from PIL import Image

        folder = tmp_path / "images"
        folder.mkdir()
        for index in range(8):
            Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        change = ["--dataset", str(folder)]
    _run(tmp_path, "first", *SMALL)

    _, cached = _run(tmp_path, "changed", *SMALL, *change)

    assert cached == {"resnet18": []}


RBF = ["--CKA_type", "kernel_CKA"]


@pytest.mark.parametrize(
    "first, change",
    [([], ["--hsic", "biased"]), (RBF, ["--CKA_type", "linear_CKA"]), (RBF, ["--rbf_sigma", "2"])],
    ids=["estimator", "kernel", "sigma"],
)
def test_kernel_settings_reuse_cached_grams(tmp_path, first, change):
    _run(tmp_path, "first", *SMALL, *first)

    changed, cached = _run(tmp_path, "changed", *SMALL, *first, *change)
    _, fresh = _run(tmp_path, "fresh", *SMALL, *first, *change, "--cache", "0")

    assert cached == {"resnet18": [0, 1]}
    for name, matrix in _matrices(changed).items():
        assert np.allclose(matrix, _matrices(tmp_path / "fresh")[name], atol=1e-12)


def test_rbf_recomputes_unchecked_grams(tmp_path):
    # Linear CKA skips the distance check of linear_gram, so its cached matrices do
    # not serve RBF kernels; RBF runs check it, and their matrices serve linear CKA.
    _run(tmp_path, "first", *SMALL)

    _, cached = _run(tmp_path, "rbf", *SMALL, *RBF)
    _, again = _run(tmp_path, "linear", *SMALL)

    assert cached == {"resnet18": []}
    assert again == {"resnet18": [0, 1]}


def test_other_depths_add_to_cached_entries(tmp_path):
    _run(tmp_path, "depth1", *SMALL)
    _run(tmp_path, "depth2", *SMALL[:-1], "2")

    _, cached = _run(tmp_path, "again", *SMALL)

    assert cached == {"resnet18": [0, 1]}


def test_code_change_recomputes(tmp_path, monkeypatch):
    import engine.run

    _run(tmp_path, "first", *SMALL)
    monkeypatch.setattr(engine.run, "code_fingerprint", lambda: "changed code")

    _, cached = _run(tmp_path, "second", *SMALL)

    assert cached == {"resnet18": []}


def test_changed_weights_file_recomputes(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.manual_seed(1)
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    torch.save(model.state_dict(), weights)
    _run(tmp_path, "first", *SMALL, "--weights", str(weights))
    with torch.no_grad():
        model.conv1.weight.mul_(2.0)
    torch.save(model.state_dict(), weights)
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 1_000_000))

    _, cached = _run(tmp_path, "second", *SMALL, "--weights", str(weights))

    assert cached == {"resnet18-weights": []}


def test_added_model_reuses_earlier_kernels(tmp_path):
    common = ["--input_shape", "32", "--batch_size", "4", "--dataloader_size", "2", "--layers_depth", "1",
              "--compare_all", "1"]
    first, _ = _run(tmp_path, "first", "--models_names", "resnet18", *common)

    second, cached = _run(tmp_path, "second", "--models_names", "resnet18", "squeezenet1_1", *common)

    assert cached == {"resnet18": [0, 1], "squeezenet1_1": []}
    assert np.array_equal(
        _matrices(first)["depth_1_resnet18_vs_resnet18.npz"], _matrices(second)["depth_1_resnet18_vs_resnet18.npz"]
    )
    assert "depth_1_squeezenet1_1_vs_resnet18.npz" in _matrices(second)


RESUMABLE = ["--models_names", "resnet34", "--compare_models_names", "resnet18", "--input_shape", "96",
             "--batch_size", "8", "--dataloader_size", "10", "--layers_depth", "2"]


def _command(output, cache, *extra):
    return [sys.executable, str(ROOT / "main_feat_maps.py"), *BASE, *RESUMABLE, "--output_path", str(output),
            "--cache_dir", str(cache), *extra]


def _environment(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(temporary), "TORCH_HOME": str(tmp_path / "torch_home")}


def _start_and_stop_after_first_batch(tmp_path, cache, output, stop_signal):
    process = subprocess.Popen(_command(output, cache), env=_environment(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(cache.glob("*/batch*.npz")):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_stopped_run_resumes_to_same_files(tmp_path, stop_signal):
    reference = tmp_path / "reference"
    completed = subprocess.run(_command(reference, tmp_path / "unused", "--cache", "0"),
                               env=_environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    cache, output = tmp_path / "cache", tmp_path / "out"

    status, stderr = _start_and_stop_after_first_batch(tmp_path, cache, output, stop_signal)

    entries = list(cache.glob("*/batch*.npz"))
    assert 0 < len(entries) < 20, "the run was not stopped part-way"
    for entry in entries:
        with np.load(entry) as archive:
            assert archive["grams"].shape[1:] == (8, 8), entry
    assert not output.exists()
    if stop_signal == signal.SIGINT:
        assert status == EXIT_INTERRUPTED
        assert "interrupted before any file was written" in stderr
        assert not list((tmp_path / "tmp").iterdir()), "a temporary folder was left"

    resumed = subprocess.run(_command(output, cache), env=_environment(tmp_path),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((output / "run_record.json").read_text())
    assert record["models"][0]["batches_from_cache"]
    expected = _matrices(reference)
    assert _matrices(output).keys() == expected.keys()
    for name, matrix in _matrices(output).items():
        assert np.array_equal(matrix, expected[name]), name
    for csv in reference.glob("*.csv"):
        assert (output / csv.name).read_text() == csv.read_text()


def test_two_gloo_ranks_match_one_process(tmp_path):
    arguments = [*BASE, "--models_names", "resnet18", "resnet34", "--compare_all", "1", "--input_shape", "32",
                 "--batch_size", "4", "--dataloader_size", "5", "--layers_depth", "2", "--cache", "0"]
    environment = _environment(tmp_path)
    single = subprocess.run([sys.executable, str(ROOT / "main_feat_maps.py"), *arguments,
                             "--output_path", str(tmp_path / "single")],
                            env=environment, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr

    ranks = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "main_feat_maps.py"), *arguments, "--output_path", str(tmp_path / "ranks")],
        env=environment, capture_output=True, text=True, timeout=600,
    )

    assert ranks.returncode == 0, ranks.stderr
    record = json.loads((tmp_path / "ranks" / "run_record.json").read_text())
    assert record["processes"] == 2
    expected = _matrices(tmp_path / "single")
    assert len(expected) == 3
    for name, matrix in _matrices(tmp_path / "ranks").items():
        assert np.allclose(matrix, expected[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("memory_bytes", [0, 400, 1 << 20], ids=["disk", "spill", "memory"])
def test_temporary_cache_memory_budget(memory_bytes):
    from engine.cache import KernelCache

    grams = [torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(batch)) for batch in range(3)]
    with KernelCache(memory_bytes=memory_bytes) as cache:
        for batch, matrices in enumerate(grams):
            cache.put_grams("model", batch, ["a", "b", "c"], matrices, for_distances=False)
        cache.put_grams("model", 0, ["d"], grams[0][:1] * 2, for_distances=True)
        files = sorted(path.name for path in pathlib.Path(cache.folder).rglob("*.npz"))

        assert cache.stored_layers("model", 0) == {"a", "b", "c", "d"}
        assert cache.stored_layers("model", 0, for_distances=True) == {"d"}
        assert cache.stored_layers("model", 3) == set()
        assert torch.equal(cache.get_grams("model", 0, ["d", "a"]), torch.stack([grams[0][0] * 2, grams[0][0]]))
        for batch, matrices in enumerate(grams[1:], start=1):
            assert torch.equal(cache.get_grams("model", batch, ["a", "b", "c"]), matrices)
    expected_files = {0: 3, 400: 2, 1 << 20: 0}[memory_bytes]
    assert len(files) == expected_files


def test_scratch_store_spills_to_disk():
    from engine.store import ScratchStore

    arrays = {f"batch{index}": torch.full((10,), index, dtype=torch.uint8) for index in range(4)}
    with ScratchStore(memory_bytes=25) as scratch:
        for key, array in arrays.items():
            scratch.put(key, array)
        files = sorted(path.name for path in pathlib.Path(scratch.folder).iterdir())

        for key, array in arrays.items():
            assert key in scratch
            assert torch.equal(scratch.get(key), array)
        assert "batch9" not in scratch
        scratch.get("batch0").fill_(9)
        assert torch.equal(scratch.get("batch0"), arrays["batch0"])
        scratch.put("batch0", arrays["batch1"])
        assert torch.equal(scratch.get("batch0"), arrays["batch1"])
    assert files == ["batch2.npy", "batch3.npy"]
