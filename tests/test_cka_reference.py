"""CKA estimators against values computed in float64 from the published formulas.

``data/cka_reference`` contains the inputs (``cases.npz``) and the expected values
(``expected.json``, whose ``conventions`` entry states the formulas); ``null`` marks an
undefined value.
"""

import json
import math
import pathlib
import re

import numpy as np
import pytest
import torch

from cka import minibatch_cka

REFERENCE = pathlib.Path(__file__).parent / "data" / "cka_reference"
CASES = json.loads((REFERENCE / "expected.json").read_text())["cases"]
ARRAYS = np.load(REFERENCE / "cases.npz")
KEY = re.compile(r"(?P<kernel>linear|rbf)_(?P<estimator>biased|unbiased)(?:_sigma(?P<sigma>[\d.]+))?")


def _batches(case: dict, side: str, dtype=torch.float64) -> list[torch.Tensor]:
    name = case["name"]
    return [
        torch.from_numpy(ARRAYS[f"{name}__{side}{batch}"]).to(dtype)
        for batch in range(case["batches"])
    ]


def _settings(key: str) -> dict:
    match = KEY.fullmatch(key)
    assert match, f"unexpected key {key}"
    return {
        "kernel": match["kernel"],
        "estimator": match["estimator"],
        "sigma": float(match["sigma"] or 1.0),
    }


REFERENCE_VALUES = [
    pytest.param(case, key, value, id=f"{case['name']}-{key}")
    for case in CASES
    for key, value in case["expected"].items()
]


@pytest.mark.parametrize(("case", "key", "expected"), REFERENCE_VALUES)
def test_reference_value(case, key, expected):
    value = minibatch_cka(_batches(case, "x"), _batches(case, "y"), **_settings(key))

    if expected is None:
        assert math.isnan(value)
    else:
        assert value == pytest.approx(expected, rel=1e-6)


def test_reference_covers_every_estimator():
    keys = {key for case in CASES for key in case["expected"]}

    assert {_settings(key)["kernel"] for key in keys} == {"linear", "rbf"}
    assert {_settings(key)["estimator"] for key in keys} == {"biased", "unbiased"}


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_unbiased_rejects_three_examples(kernel):
    case = next(case for case in CASES if case["name"] == "three_examples")

    with pytest.raises(ValueError, match="needs at least 4 examples per batch, got 3"):
        minibatch_cka(_batches(case, "x"), _batches(case, "y"), kernel=kernel, estimator="unbiased")


@pytest.mark.parametrize(
    ("case", "key", "expected"),
    [
        pytest.param(case, key, value, id=f"{case['name']}-{key}")
        for case in CASES
        if case["name"] == "large_offset_scale"
        for key, value in case["expected"].items()
    ],
)
def test_large_offset_in_float32(case, key, expected):
    # Features near 1e4 keep about 3 of float32's 7 digits below the offset. Centering
    # before the Gram product keeps CKA as accurate as float32 inputs allow.
    value = minibatch_cka(
        _batches(case, "x", torch.float32), _batches(case, "y", torch.float32), **_settings(key)
    )

    assert value == pytest.approx(expected, abs=1e-4)
