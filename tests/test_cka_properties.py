"""Properties CKA must have, and agreement between the batched path and one-shot formulas."""

import math

import numpy as np
import pytest
import torch

from cka import (
    MinibatchCKA,
    accurate_gram,
    channel_grams,
    shift_features,
    hsic,
    hsic_vectors,
    layer_kernels,
    linear_gram,
    minibatch_cka,
    rbf_from_gram,
)

SETTINGS = [
    pytest.param({"kernel": "linear", "estimator": "unbiased"}, id="linear-unbiased"),
    pytest.param({"kernel": "linear", "estimator": "biased"}, id="linear-biased"),
    pytest.param({"kernel": "rbf", "estimator": "unbiased"}, id="rbf-unbiased"),
    pytest.param({"kernel": "rbf", "estimator": "biased"}, id="rbf-biased"),
]


def _features(seed: int, batches: int = 3, n: int = 12, dim: int = 20) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=generator, dtype=torch.float64) for _ in range(batches)]


def _related(features: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(features[0].shape[1], 15, generator=generator, dtype=torch.float64)
    related = []
    for x in features:
        noise = torch.randn(x.shape[0], 15, generator=generator, dtype=torch.float64)
        related.append(torch.tanh(x.double() @ weights) + 0.3 * noise)
    return related


def _song_unbiased_hsic(kernel_x: np.ndarray, kernel_y: np.ndarray) -> float:
    """Song et al. (2012), equation (5), written out term by term."""
    n = kernel_x.shape[0]
    k = kernel_x - np.diag(np.diag(kernel_x))
    l = kernel_y - np.diag(np.diag(kernel_y))
    ones = np.ones(n)
    trace_term = np.trace(k @ l)
    sum_term = (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
    cross_term = 2.0 / (n - 2) * (ones @ k @ l @ ones)
    return (trace_term + sum_term - cross_term) / (n * (n - 3))


@pytest.mark.parametrize("settings", SETTINGS)
def test_self_similarity_is_one(settings):
    features = _features(0)

    assert minibatch_cka(features, features, **settings) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("settings", SETTINGS)
def test_symmetric_in_its_arguments(settings):
    features_x = _features(1)
    features_y = _related(features_x, 2)

    forward = minibatch_cka(features_x, features_y, **settings)
    backward = minibatch_cka(features_y, features_x, **settings)

    assert forward == pytest.approx(backward, rel=1e-12)


@pytest.mark.parametrize("settings", SETTINGS)
def test_invariant_to_orthogonal_transform(settings):
    features_x = _features(3)
    features_y = _related(features_x, 4)
    rotation, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64))

    original = minibatch_cka(features_x, features_y, **settings)
    rotated = minibatch_cka([x @ rotation for x in features_x], features_y, **settings)

    assert rotated == pytest.approx(original, rel=1e-10)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("scale", [1e-3, 7.0, 1e4])
def test_invariant_to_isotropic_scaling(settings, scale):
    features_x = _features(6)
    features_y = _related(features_x, 7)

    original = minibatch_cka(features_x, features_y, **settings)
    scaled = minibatch_cka([scale * x for x in features_x], features_y, **settings)

    assert scaled == pytest.approx(original, rel=1e-10)


@pytest.mark.parametrize("settings", SETTINGS)
def test_invariant_to_translation(settings):
    features_x = _features(8)
    features_y = _related(features_x, 9)

    original = minibatch_cka(features_x, features_y, **settings)
    shifted = minibatch_cka([x + 50.0 for x in features_x], features_y, **settings)

    assert shifted == pytest.approx(original, rel=1e-10)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_unbiased_hsic_matches_song_formula(kernel):
    features_x, features_y = _features(10, batches=1)[0], _related(_features(10, batches=1), 11)[0]
    kernel_x = layer_kernels(features_x, kernel)
    kernel_y = layer_kernels(features_y, kernel)

    value = float(hsic(kernel_x, kernel_y, "unbiased"))

    assert value == pytest.approx(_song_unbiased_hsic(kernel_x.numpy(), kernel_y.numpy()), rel=1e-10)


def test_biased_one_batch_is_classic_cka():
    features_x = _features(12, batches=1, n=30)[0]
    features_y = _related([features_x], 13)[0]
    centered_x = features_x - features_x.mean(0)
    centered_y = features_y - features_y.mean(0)
    # Kornblith et al. (2019), equation for linear CKA with centered features.
    classic = (
        torch.linalg.matrix_norm(centered_y.T @ centered_x) ** 2
        / (torch.linalg.matrix_norm(centered_x.T @ centered_x) * torch.linalg.matrix_norm(centered_y.T @ centered_y))
    )

    value = minibatch_cka([features_x], [features_y], kernel="linear", estimator="biased")

    assert value == pytest.approx(float(classic), rel=1e-10)


@pytest.mark.parametrize("settings", SETTINGS)
def test_all_pairs_product_matches_one_pair_at_a_time(settings):
    layers_x = [_features(20 + i) for i in range(3)]
    layers_y = [_related(layers_x[0], 30 + i) for i in range(2)]
    sigma = 1.0

    accumulator = MinibatchCKA()
    for batch in range(3):
        stack_x = torch.stack([linear_gram(layer[batch]) for layer in layers_x]).double()
        stack_y = torch.stack([linear_gram(layer[batch]) for layer in layers_y]).double()
        if settings["kernel"] == "rbf":
            stack_x, stack_y = rbf_from_gram(stack_x, sigma), rbf_from_gram(stack_y, sigma)
        accumulator.update(
            hsic_vectors(stack_x, settings["estimator"]), hsic_vectors(stack_y, settings["estimator"])
        )
    matrix = accumulator.compute()

    assert matrix.shape == (3, 2)
    for i, layer_x in enumerate(layers_x):
        for j, layer_y in enumerate(layers_y):
            assert float(matrix[i, j]) == pytest.approx(minibatch_cka(layer_x, layer_y, **settings), rel=1e-12)


def test_minibatch_sums_hsic_over_every_batch():
    features_x = _features(40, batches=3)
    features_y = _related(features_x, 41)
    kernels_x = [layer_kernels(x) for x in features_x]
    kernels_y = [layer_kernels(y) for y in features_y]
    cross = sum(float(hsic(k, l)) for k, l in zip(kernels_x, kernels_y))
    self_x = sum(float(hsic(k, k)) for k in kernels_x)
    self_y = sum(float(hsic(l, l)) for l in kernels_y)

    value = minibatch_cka(features_x, features_y)
    last_batch_only = minibatch_cka(features_x[-1:], features_y[-1:])

    assert value == pytest.approx(cross / math.sqrt(self_x * self_y), rel=1e-12)
    assert value != pytest.approx(last_batch_only, rel=1e-3)


@pytest.mark.parametrize("settings", SETTINGS)
def test_constant_side_gives_nan(settings):
    features_x = [torch.full((10, 8), 0.1, dtype=torch.float32) for _ in range(2)]
    features_y = [torch.randn(10, 8) for _ in range(2)]

    assert math.isnan(minibatch_cka(features_x, features_y, **settings))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast(dtype):
    features_x = [x.float() * 300.0 for x in _features(50)]
    features_y = _related(features_x, 51)

    reference = minibatch_cka([x.double() for x in features_x], features_y)
    value = minibatch_cka([x.to(dtype) for x in features_x], [y.to(dtype) for y in features_y])

    assert math.isfinite(value)
    assert value == pytest.approx(reference, abs=0.02)


def test_large_mean_float32_matches_float64():
    features_x = [x + 100.0 for x in _features(60, n=64, dim=256)]
    features_y = _related(features_x, 61)

    reference = minibatch_cka(features_x, [y + 100.0 for y in features_y])
    value = minibatch_cka([x.float() for x in features_x], [(y + 100.0).float() for y in features_y])

    assert math.isfinite(value)
    assert value == pytest.approx(reference, abs=1e-5)


def test_shifted_constant_features_are_exactly_zero():
    features = torch.full((7, 5), 0.1, dtype=torch.float32)

    assert torch.count_nonzero(shift_features(features, 3)) == 0


@pytest.mark.parametrize("n", [5, 8, 10, 32])
@pytest.mark.parametrize("settings", SETTINGS)
def test_constant_layer_is_nan_for_every_batch_size(settings, n):
    if n < 5 and settings["estimator"] == "unbiased":
        pytest.skip("the unbiased estimator needs 4 examples")
    constant = [torch.full((n, 6), 0.3) for _ in range(2)]
    varied = [torch.randn(n, 6, generator=torch.Generator().manual_seed(n)) for _ in range(2)]

    assert math.isnan(minibatch_cka(constant, varied, **settings))
    assert math.isnan(minibatch_cka(constant, constant, **settings))


def test_rbf_accurate_for_clustered_examples_with_outlier():
    # 31 examples close together far from the origin plus one far away: the unshifted
    # float32 product cannot resolve the small distances that set the RBF bandwidth.
    generator = torch.Generator().manual_seed(0)
    for outlier in (0, 5):
        base = 1000.0 + torch.randn(32, 256, generator=generator, dtype=torch.float64)
        base[outlier] += 50.0
        related = base @ torch.randn(256, 64, generator=generator, dtype=torch.float64) / 16
        expected = minibatch_cka([base], [related], kernel="rbf")

        value = minibatch_cka([base.float()], [related.float()], kernel="rbf")

        assert value == pytest.approx(expected, abs=1e-4), outlier


def _centered(gram: torch.Tensor) -> torch.Tensor:
    n = gram.shape[-1]
    center = torch.eye(n, dtype=torch.float64) - 1.0 / n
    return center @ gram.double() @ center


def _centered_error(gram: torch.Tensor, features: torch.Tensor) -> float:
    """Largest error of a Gram matrix after double centering, relative to the exact one."""
    flat = features.double().reshape(features.shape[0], -1)
    exact = _centered(flat @ flat.T)
    return float((_centered(gram) - exact).abs().max() / exact.abs().max())


# Products of features from this many bytes run on them unshifted. With 0, every product
# of these small test inputs does.
PRODUCT_PATHS = pytest.mark.parametrize("plain_bytes", [0, None], ids=["plain-product", "shifted-product"])


def _set_plain_bytes(monkeypatch, plain_bytes: int | None) -> None:
    import cka.kernels

    if plain_bytes is not None:
        monkeypatch.setattr(cka.kernels, "_PLAIN_PRODUCT_BYTES", plain_bytes)


@PRODUCT_PATHS
def test_channel_grams_sum_to_the_gram(monkeypatch, plain_bytes):
    _set_plain_bytes(monkeypatch, plain_bytes)
    features = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(7)) + 0.2
    scales = torch.rand(5, generator=torch.Generator().manual_seed(8)) + 0.5
    flat = features.double().reshape(6, -1)
    scaled = (features * scales[:, None, None]).double().reshape(6, -1)

    grams, gram = channel_grams(features)

    assert grams.shape == (5, 6, 6)
    assert grams.dtype == torch.float64
    assert torch.equal(gram, grams.sum(dim=0).float())
    assert torch.allclose(_centered(gram), _centered(flat @ flat.T), atol=1e-4)
    weighted = torch.tensordot(scales.double().square(), grams, dims=1)
    assert torch.allclose(_centered(weighted), _centered(scaled @ scaled.T), atol=1e-4)
    shifted = flat - flat[:1]
    assert torch.allclose(gram.double(), shifted @ shifted.T, atol=1e-4) == (plain_bytes is None)


@PRODUCT_PATHS
def test_channel_grams_large_offset(monkeypatch, plain_bytes):
    # Unshifted products of such features lose their digits, so every path ends with
    # per-channel matrices of features shifted by their first example.
    _set_plain_bytes(monkeypatch, plain_bytes)
    features = 1000.0 + torch.randn(32, 8, 4, 4, generator=torch.Generator().manual_seed(13))
    shifted = (features - features[:1]).double().reshape(32, 8, 16).transpose(0, 1)

    grams, gram = channel_grams(features)

    assert torch.allclose(grams, shifted @ shifted.transpose(1, 2), rtol=1e-5, atol=1e-3)
    assert _centered_error(gram, features) <= 1e-6


@pytest.mark.parametrize("chunk_bytes", [256, 600, 1 << 20], ids=["small-steps", "partial-last-step", "one-step"])
def test_channel_products_in_steps(monkeypatch, chunk_bytes):
    import cka.kernels

    monkeypatch.setattr(cka.kernels, "_CHUNK_BYTES", chunk_bytes)
    features = torch.randn(6, 5, 12, generator=torch.Generator().manual_seed(14)) + 2.0
    shifted = (features - features[:1]).double().transpose(0, 1)

    grams = cka.kernels._channel_products(features, shifted=True)

    assert torch.allclose(grams, shifted @ shifted.transpose(1, 2), atol=1e-4)


def test_plain_product_kept_when_well_centered(monkeypatch):
    _set_plain_bytes(monkeypatch, 0)
    features = torch.randn(32, 256, generator=torch.Generator().manual_seed(9)) + 0.5
    gram = features @ features.T

    assert accurate_gram(gram, features) is gram
    assert torch.equal(linear_gram(features), gram)


@PRODUCT_PATHS
@pytest.mark.parametrize("outlier", [0.0, 200.0], ids=["first-example-central", "first-example-far-out"])
def test_offset_product_runs_again(monkeypatch, plain_bytes, outlier):
    _set_plain_bytes(monkeypatch, plain_bytes)
    features = 3000.0 + torch.randn(32, 256, generator=torch.Generator().manual_seed(9))
    features[0] += outlier
    plain = features @ features.T
    shifted = shift_features(features)
    first = plain if plain_bytes == 0 else shifted @ shifted.T

    result = linear_gram(features)

    # A first example far out makes the product run once more, around the central one.
    assert torch.equal(result, shifted @ shifted.T) == (outlier == 0.0)
    assert _centered_error(result, features) <= 1e-6
    assert torch.equal(accurate_gram(first, features), result)
    assert _centered_error(plain, features) > 1e-5


@pytest.mark.parametrize("chunk_bytes", [256, 600, 1 << 20], ids=["small-steps", "partial-last-step", "one-step"])
@pytest.mark.parametrize("reference", [0, 3])
def test_products_in_steps_match_one_product(monkeypatch, chunk_bytes, reference):
    import cka.kernels

    monkeypatch.setattr(cka.kernels, "_CHUNK_BYTES", chunk_bytes)
    features = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(11)) + 2.0
    shifted = shift_features(features, reference).double()

    gram = cka.kernels._shifted_product(features, reference)

    assert torch.allclose(gram.double(), shifted @ shifted.T, atol=1e-4)


def test_gram_of_one_example_for_distances():
    features = torch.randn(1, 5, generator=torch.Generator().manual_seed(12))

    gram = linear_gram(features, for_distances=True)

    assert gram.shape == (1, 1)
    assert gram.item() == 0.0


@pytest.mark.parametrize("n", [2, 3, 4, 7, 64])
def test_median_distance_matches_numpy(n):
    import cka.kernels

    generator = torch.Generator().manual_seed(n)
    # Integer values make ties, which a selection must handle as a sort does.
    values = torch.randint(0, 5, (3, n, n), generator=generator).double()
    distances = values + values.transpose(1, 2)
    rows, cols = np.triu_indices(n, k=1)
    expected = np.median(distances.numpy()[:, rows, cols], axis=-1)

    medians = cka.kernels._median_off_diagonal(distances)

    assert np.array_equal(medians.numpy(), expected)
