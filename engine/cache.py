"""Per-batch Gram matrices on disk, reused by later runs that need the same ones.

An entry is one model's linear Gram matrices for one batch, with the names of the
layers they belong to; every kernel and HSIC estimator is computed from them. Its folder
name is a hash of everything that determines those numbers: the library and its
version, the model, its weights, its input size and preprocessing, the images and their
batching, the device type, and the source code of the packages that compute them.
Changing any of them gives a new folder, so stale entries are never read, only left
behind. Files are written under a temporary name and renamed, so a reader never sees
half a file and a killed run leaves only whole entries.
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from data import torch_home

from .atomic import atomic_path

__all__ = ["CACHE_FORMAT", "KernelCache", "code_fingerprint", "default_cache_dir", "fingerprint"]

CACHE_FORMAT = 4
"""Version of the entries' layout."""

_VERSIONED_PACKAGES = {
    "torchvision": ("torch", "torchvision"),
    "pretrainedmodels": ("torch", "torchvision", "pretrainedmodels"),
    "timm": ("torch", "timm"),
}

# Source files whose changes can change a Gram matrix: the kernels, the hooks and layer
# choice, the image pipeline, and the pass that ties them together.
_REPOSITORY = Path(__file__).resolve().parent.parent
_NUMERIC_SOURCES = ("cka", "data", "models", "engine/run.py")


def default_cache_dir() -> str:
    """Return ``$TORCH_HOME/cka_kernels``, by default ``~/.cache/torch/cka_kernels``."""
    return os.path.join(torch_home(), "cka_kernels")


def code_fingerprint() -> str:
    """Hash the source files that compute Gram matrices, so code changes invalidate entries."""
    digest = hashlib.sha256()
    for name in _NUMERIC_SOURCES:
        path = _REPOSITORY / name
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(source.relative_to(_REPOSITORY)).encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


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
    """A folder of per-batch Gram matrices and model traces.

    Use it as a context manager. With ``folder=None`` it lives in a temporary folder
    that leaving deletes, and it keeps entries in memory until they reach
    ``memory_bytes``, so a run without a cache writes nothing for small runs and still
    keeps memory bounded for large ones.

    Args:
        folder: the cache folder, created if missing; None for a temporary one.
        memory_bytes: with ``folder=None``, how many bytes of Gram matrices to keep in
            memory before writing entries to the temporary folder.
    """

    def __init__(self, folder: str | None = None, memory_bytes: int = 32 << 20) -> None:
        self.requested = folder
        self.folder: str | None = None
        self._memory: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
        self._memory_left = memory_bytes if folder is None else 0

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
        self._memory.clear()

    def _grams_path(self, model_key: str, batch: int) -> str:
        return os.path.join(self.folder, model_key, f"batch{batch}.npz")

    def _read(self, model_key: str, batch: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        path = self._grams_path(model_key, batch)
        if path in self._memory:
            return self._memory[path]
        if not os.path.exists(path):
            return None
        with np.load(path) as archive:
            return archive["layers"].tolist(), archive["grams"], archive["for_distances"]

    def _write(self, model_key: str, batch: int, entry: tuple[list[str], np.ndarray, np.ndarray]) -> None:
        path = self._grams_path(model_key, batch)
        names, grams, checked = entry
        if path in self._memory:
            self._memory_left += self._memory.pop(path)[1].nbytes
        if 0 < grams.nbytes <= self._memory_left and not os.path.exists(path):
            # A copy, so the caller's tensor can change without changing the entry.
            self._memory[path] = (names, grams.copy(), checked)
            self._memory_left -= grams.nbytes
            return
        with atomic_path(path) as partial:
            with open(partial, "wb") as handle:
                np.savez(handle, layers=np.array(names), grams=grams, for_distances=checked)

    def put_grams(
        self, model_key: str, batch: int, layers: list[str], grams: torch.Tensor, for_distances: bool
    ) -> None:
        """Store one batch's ``(layers, n, n)`` Gram matrices with their layer names.

        ``for_distances`` records whether they were checked to be accurate for distances
        (``linear_gram``), which RBF kernels need. Layers of an existing entry that
        ``layers`` lacks are kept, so runs at other depths add to an entry instead of
        replacing it.
        """
        names = list(layers)
        array = grams.detach().cpu().numpy()
        checked = np.full(len(names), for_distances)
        existing = self._read(model_key, batch)
        if existing is not None:
            old_names, old_grams, old_checked = existing
            extra = [index for index, name in enumerate(old_names) if name not in set(names)]
            if extra and old_grams.shape[1:] == array.shape[1:]:
                names += [old_names[index] for index in extra]
                array = np.concatenate([array, old_grams[extra].astype(array.dtype)])
                checked = np.concatenate([checked, old_checked[extra]])
        self._write(model_key, batch, (names, array, checked))

    def stored_layers(self, model_key: str, batch: int, for_distances: bool = False) -> set[str]:
        """Return the layer names an entry covers; empty when there is no entry.

        With ``for_distances``, only layers whose matrices were checked for distances.
        """
        path = self._grams_path(model_key, batch)
        if path in self._memory:
            names, _, checked = self._memory[path]
        elif os.path.exists(path):
            with np.load(path) as archive:
                names = archive["layers"].tolist()
                checked = archive["for_distances"]
        else:
            return set()
        return {name for name, ok in zip(names, checked.tolist()) if ok or not for_distances}

    def get_grams(self, model_key: str, batch: int, layers: list[str]) -> torch.Tensor:
        """Load the Gram matrices of ``layers``, in that order, from an entry that covers them."""
        names, grams, _ = self._read(model_key, batch)
        row = {name: index for index, name in enumerate(names)}
        return torch.from_numpy(grams[[row[name] for name in layers]])

    def put_json(self, model_key: str, name: str, content) -> None:
        """Store a JSON document next to a model's entries."""
        with atomic_path(os.path.join(self.folder, model_key, f"{name}.json")) as partial:
            with open(partial, "w") as handle:
                json.dump(content, handle)

    def get_json(self, model_key: str, name: str):
        """Load what ``put_json`` stored, or None."""
        path = os.path.join(self.folder, model_key, f"{name}.json")
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return json.load(handle)
