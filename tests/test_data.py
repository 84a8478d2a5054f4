"""Image sources and per-model preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from data import DatasetError, Normalizer, open_images, resized_batches


def test_sample_photos_are_deterministic():
    first = open_images("sample_photos", 25, seed=3)
    second = open_images("sample_photos", 25, seed=3)

    assert len(first) == 25
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))
    assert all(image.mode == "RGB" for image in first)


def test_sample_photos_depend_on_seed():
    first = open_images("sample_photos", 4, seed=0)
    second = open_images("sample_photos", 4, seed=1)

    assert not np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_sample_photos_any_count():
    images = open_images("sample_photos", 1000)

    assert len(images) == 1000
    assert images[999].width == images[999].height


def _write_images(folder, count, mode="RGB"):
    for index in range(count):
        sub = folder / f"class{index % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = np.full((20 + index, 30, 3) if mode == "RGB" else (20 + index, 30), index * 10, dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"image{index}.png")


def test_folder_with_class_subfolders(tmp_path):
    _write_images(tmp_path, 6)

    images = open_images(str(tmp_path), 4, seed=0)

    assert len(images) == 4
    assert len(set(images.indices)) == 4
    assert images.indices == open_images(str(tmp_path), 4, seed=0).indices


def test_grayscale_becomes_three_channels(tmp_path):
    _write_images(tmp_path, 2, mode="L")

    images = open_images(str(tmp_path), 2)
    batch = next(iter(resized_batches(images, 16, 2)))

    assert images[0].mode == "RGB"
    assert batch.shape == (2, 3, 16, 16)


def test_folder_with_too_few_images(tmp_path):
    _write_images(tmp_path, 3)

    with pytest.raises(DatasetError, match=r"needs 10 images .* has 3; lower --batch_size or --dataloader_size"):
        open_images(str(tmp_path), 10)


def test_unknown_dataset_suggests_class_name():
    with pytest.raises(DatasetError, match="Did you mean .*CIFAR10"):
        open_images("cifar10", 4)


def test_missing_dataset_without_download(tmp_path):
    with pytest.raises(DatasetError, match=rf"CIFAR10 is not in {tmp_path}"):
        open_images("CIFAR10", 4, data_root=str(tmp_path), download=False)


def test_bgr_0_255_preprocessing():
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    normalizer = Normalizer(mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0),
                            value_range=(0.0, 255.0), color_space="BGR")

    values = normalizer(red).flatten().tolist()

    # A pure red pixel in BGR order: blue 0, green 0, red 255, minus the BGR means.
    assert values == pytest.approx([0.0 - 104.0, 0.0 - 117.0, 255.0 - 128.0])


def test_rgb_imagenet_preprocessing():
    grey = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    tensor = Normalizer(mean, std)(grey)[0]

    expected = [(128 / 255 - m) / s for m, s in zip(mean, std)]
    assert tensor.shape == (3, 2, 2)
    assert tensor[:, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)


def test_resized_batches_keep_order():
    images = open_images("sample_photos", 6)

    loaded = list(resized_batches(images, 8, 4))
    direct = torch.stack([torch.from_numpy(np.array(images.resized(i, 8))).permute(2, 0, 1) for i in range(6)])

    assert [len(batch) for batch in loaded] == [4, 2]
    assert loaded[0].dtype == torch.uint8
    assert torch.equal(torch.cat(loaded), direct)


def test_resized_matches_crop_then_resize():
    images = open_images("sample_photos", 3, seed=5)

    fast = np.asarray(images.resized(2, 32), dtype=float)
    plain = np.asarray(images[2].resize((32, 32), Image.Resampling.BILINEAR), dtype=float)

    assert fast.shape == plain.shape == (32, 32, 3)
    assert np.abs(fast - plain).mean() < 2.0


def test_normalizer_matches_transform():
    image = open_images("sample_photos", 1)[0]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.from_numpy(np.array(image.resize((16, 16)))).permute(2, 0, 1)

    normalised = Normalizer(mean, std)(pixels.unsqueeze(0))[0]

    expected = (pixels.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(normalised, expected, atol=1e-5)


def test_sixteen_bit_grayscale_keeps_its_contrast(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")

    image = open_images(str(tmp_path), 1)[0]
    pixels = np.asarray(image)

    assert image.mode == "RGB"
    assert pixels.min() == 0
    assert pixels.max() == 255
    assert 100 < pixels.mean() < 155


def test_non_image_file_is_named_before_the_run(tmp_path):
    _write_images(tmp_path, 4)
    (tmp_path / "class0" / "notes.jpg").write_text("not an image")

    with pytest.raises(DatasetError, match=r"cannot read the image file .*notes.jpg .*remove or replace it"):
        open_images(str(tmp_path), 5)


def test_truncated_image_is_named_when_loaded(tmp_path):
    _write_images(tmp_path, 4)
    path = tmp_path / "class0" / "image0.png"
    path.write_bytes(path.read_bytes()[:45])  # the header survives, the pixel data does not
    images = open_images(str(tmp_path), 4)

    with pytest.raises(DatasetError, match=r"cannot read the image file .*image0.png"):
        for position in range(4):
            images.resized(position, 8)


def test_dataset_needing_other_arguments():
    with pytest.raises(DatasetError, match="--dataset FakeData cannot be used"):
        open_images("FakeData", 4)


def test_dataset_path_to_a_file(tmp_path):
    _write_images(tmp_path, 1)

    with pytest.raises(DatasetError, match="is a file; give the folder"):
        open_images(str(tmp_path / "class0" / "image0.png"), 1)


def test_loaders_survive_pickling(tmp_path):
    import pickle

    _write_images(tmp_path, 4)

    for images in (open_images("sample_photos", 3), open_images(str(tmp_path), 3)):
        copy = pickle.loads(pickle.dumps(images))
        assert np.array_equal(np.asarray(copy[1]), np.asarray(images[1]))
