"""Per-batch packed kernels on disk, reused by later runs that need the same ones.

An entry is one model's packed centered kernels for one batch and one kernel setting,
with the names of the layers it covers. Its folder name is a hash of everything that
determines those numbers: the library and its version, the model, its weights, its
input size and preprocessing, the images and their batching, the device type and the
cache format. Changing any of them gives a new folder, so stale entries are never
read, only left behind. Files are written under a temporary name and renamed, so a
reader never sees half a file and a killed run leaves only whole entries.
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile

import numpy as np
import torch

__all__ = ["CACHE_FORMAT", "KernelCache", "default_cache_dir", "fingerprint"]

CACHE_FORMAT = 1
"""Version of the entries' layout and of the computation behind them."""

_VERSIONED_PACKAGES = {
    "torchvision": ("torch", "torchvision"),
    "pretrainedmodels": ("torch", "torchvision", "pretrainedmodels"),
    "timm": ("torch", "timm"),
}


def default_cache_dir() -> str:
    """Return ``$TORCH_HOME/cka_kernels``, by default ``~/.cache/torch/cka_kernels``."""
    torch_home = os.environ.get(
        "TORCH_HOME",
        os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"),
    )
    return os.path.join(torch_home, "cka_kernels")


def package_versions(library: str) -> dict[str, str]:
    """Return the versions of the packages whose updates can change a library's numbers."""
    versions = {}
    for package in _VERSIONED_PACKAGES.get(library, ("torch",)):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def fingerprint(identity: dict) -> str:
    """Hash a JSON-serialisable description into a short folder name."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class KernelCache:
    """A folder of per-batch packed kernels and model traces.

    Use it as a context manager. With ``folder=None`` it lives in a temporary folder
    that leaving deletes, so a run without a cache still keeps memory bounded.

    Args:
        folder: the cache folder, created if missing; None for a temporary one.
    """

    def __init__(self, folder: str | None = None) -> None:
        self.requested = folder
        self.folder: str | None = None

    def __enter__(self) -> "KernelCache":
        if self.requested is None:
            self.folder = tempfile.mkdtemp(prefix="cka_kernels_")
        else:
            os.makedirs(self.requested, exist_ok=True)
            self.folder = self.requested
        return self

    def __exit__(self, *exc_info) -> None:
        if self.requested is None and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def _kernels_path(self, model_key: str, settings_key: str, batch: int) -> str:
        return os.path.join(self.folder, model_key, settings_key, f"batch{batch}.npz")

    def _write(self, path: str, write) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.partial-{os.getpid()}"
        try:
            with open(partial, "wb") as handle:
                write(handle)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def put_kernels(
        self, model_key: str, settings_key: str, batch: int, layers: list[str], vectors: torch.Tensor
    ) -> None:
        """Store one batch's ``(layers, T)`` packed kernels with their layer names."""
        array = vectors.detach().to("cpu", torch.float64).numpy()
        self._write(
            self._kernels_path(model_key, settings_key, batch),
            lambda handle: np.savez(handle, layers=np.array(layers), vectors=array),
        )

    def stored_layers(self, model_key: str, settings_key: str, batch: int) -> set[str]:
        """Return the layer names an entry covers; empty when there is no entry."""
        path = self._kernels_path(model_key, settings_key, batch)
        if not os.path.exists(path):
            return set()
        with np.load(path) as archive:
            return set(archive["layers"].tolist())

    def get_kernels(self, model_key: str, settings_key: str, batch: int, layers: list[str]) -> torch.Tensor:
        """Load the packed kernels of ``layers``, in that order, from an entry that covers them."""
        with np.load(self._kernels_path(model_key, settings_key, batch)) as archive:
            row = {name: index for index, name in enumerate(archive["layers"].tolist())}
            vectors = archive["vectors"]
            return torch.from_numpy(vectors[[row[name] for name in layers]])

    def put_json(self, model_key: str, name: str, content) -> None:
        """Store a JSON document next to a model's entries."""
        text = json.dumps(content).encode()
        self._write(os.path.join(self.folder, model_key, f"{name}.json"), lambda handle: handle.write(text))

    def get_json(self, model_key: str, name: str):
        """Load what ``put_json`` stored, or None."""
        path = os.path.join(self.folder, model_key, f"{name}.json")
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return json.load(handle)
