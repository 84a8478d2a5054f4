"""Settings shared by every test."""

import pytest


@pytest.fixture(autouse=True)
def private_torch_home(tmp_path, monkeypatch):
    """Point TORCH_HOME, and with it the kernel cache, at a folder of this test.

    A test then never reads kernels cached by another test, nor fills the user's cache.
    """
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
