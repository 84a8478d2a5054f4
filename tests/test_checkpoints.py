"""Comparing a user's checkpoints: every accepted format, fine-tunes, and key mismatches."""

import json

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from data import Normalizer, open_images, resized_batches
from main_feat_maps import EXIT_USAGE, main
from models import CheckpointError, build_model, load_state_dict

SIZE = 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random resnet18 and a 10-class fine-tune of it after a few SGD steps."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None)
    torch.save(base.state_dict(), folder / "base.pt")

    finetuned = torchvision.models.resnet18(weights=None)
    finetuned.load_state_dict(base.state_dict())
    finetuned.fc = torch.nn.Linear(512, 10)
    optimizer = torch.optim.SGD(finetuned.parameters(), lr=0.01, momentum=0.9)
    normalizer = Normalizer((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    labels = torch.arange(16) % 10
    finetuned.train()
    for step, pixels in enumerate(resized_batches(open_images("sample_photos", 48, seed=1), SIZE, 16)):
        loss = torch.nn.functional.cross_entropy(finetuned(normalizer(pixels)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    finetuned.eval()

    state = finetuned.state_dict()
    torch.save(state, folder / "finetuned.pth")
    torch.save({"epoch": 3, "model_state_dict": state, "optimizer": optimizer.state_dict()}, folder / "finetuned_checkpoint.bin")
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}}, folder / "finetuned_parallel.pt")
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / "finetuned.safetensors"))
    return folder, base, finetuned


@pytest.mark.parametrize(
    "file_name",
    ["finetuned.pth", "finetuned_checkpoint.bin", "finetuned_parallel.pt", "finetuned.safetensors"],
)
def test_every_format_loads_the_same_weights(checkpoints, file_name):
    folder, _, finetuned = checkpoints

    model = build_model("torchvision", "resnet18", pretrained=False, size=SIZE, weights=str(folder / file_name))

    assert model.fc.out_features == 10
    for key, value in finetuned.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_base_and_finetune_in_one_command(checkpoints, tmp_path):
    folder, _, _ = checkpoints
    output = tmp_path / "out"

    status = main([
        "--models_names", "resnet18", "resnet18", "--torchvision", "1",
        "--weights", str(folder / "base.pt"), str(folder / "finetuned.safetensors"),
        "--compare_all", "1", "--layers_depth", "-1", "--input_shape", str(SIZE),
        "--dataset", "sample_photos", "--batch_size", "8", "--dataloader_size", "2",
        "--CKA_type", "linear_CKA", "--device", "-1", "--no_progress", "--output_path", str(output),
    ])

    assert status == 0
    cross = np.load(output / "depth_-1_resnet18-finetuned_vs_resnet18-base.npz")
    self_base = np.load(output / "depth_-1_resnet18-base_vs_resnet18-base.npz")
    assert cross["cka"].shape == self_base["cka"].shape == (40, 40)
    assert not np.allclose(cross["cka"], self_base["cka"], atol=1e-3)
    # A few steps barely move the first layers; later layers drift further.
    diagonal = np.diag(cross["cka"])
    assert diagonal[0] > 0.98
    assert diagonal[1] > 0.98
    assert diagonal[:4].mean() > diagonal[-4:].mean()
    record = json.loads((output / "run_record.json").read_text())
    weights = {model["label"]: model["weights"] for model in record["models"]}
    assert weights["resnet18-base"].endswith("base.pt")
    assert weights["resnet18-finetuned"].endswith("finetuned.safetensors")


def test_missing_and_unexpected_keys_are_listed(checkpoints, tmp_path):
    _, base, _ = checkpoints
    state = base.state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "broken.pt")

    with pytest.raises(CheckpointError, match=r"missing keys: layer1.0.conv1.weight; unexpected keys: extra.weight"):
        build_model("torchvision", "resnet18", pretrained=False, weights=str(tmp_path / "broken.pt"))


def test_other_architecture_is_rejected(checkpoints, tmp_path, caplog):
    folder, _, _ = checkpoints
    output = tmp_path / "out"

    status = main([
        "--models_names", "resnet34", "--torchvision", "1", "--weights", str(folder / "base.pt"),
        "--dataset", "sample_photos", "--batch_size", "4", "--input_shape", str(SIZE),
        "--device", "-1", "--no_progress", "--output_path", str(output),
    ])

    assert status == EXIT_USAGE
    assert "does not fit ResNet: missing keys: layer1.2.conv1.weight" in caplog.text
    assert not output.exists()


def test_file_without_state_dict(tmp_path):
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pt")

    with pytest.raises(CheckpointError, match=r"contains no state dict \(found keys \['epoch', 'note'\]\)"):
        load_state_dict(str(tmp_path / "empty.pt"))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")

    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_state_dict(str(tmp_path / "pickled.pt"))


def test_missing_weights_file_is_a_usage_error(tmp_path, caplog):
    status = main([
        "--models_names", "resnet18", "--torchvision", "1", "--weights", str(tmp_path / "nowhere.pt"),
        "--dataset", "sample_photos", "--batch_size", "4", "--device", "-1", "--no_progress",
        "--output_path", str(tmp_path / "out"),
    ])

    assert status == EXIT_USAGE
    assert "--weights: checkpoint file" in caplog.text
    assert "nowhere.pt not found" in caplog.text
