"""On-disk store of per-batch packed kernels, so memory does not grow with the batch count."""

import os
import shutil
import tempfile

import numpy as np
import torch

__all__ = ["KernelStore"]


class KernelStore:
    """Per-batch packed kernels of every model, kept in a temporary folder.

    One ``.npy`` file per (model, kernel settings, batch), holding a ``(layers, T)``
    float64 array. Files are written under a temporary name and renamed, so a reader
    never sees half a file. Use it as a context manager; leaving deletes the folder.

    Args:
        parent: folder in which to create the temporary folder; the system default
            when None.
    """

    def __init__(self, parent: str | None = None) -> None:
        self.parent = parent
        self.folder: str | None = None

    def __enter__(self) -> "KernelStore":
        self.folder = tempfile.mkdtemp(prefix="cka_kernels_", dir=self.parent)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _path(self, model_key: int, settings_key: int, batch: int) -> str:
        return os.path.join(self.folder, f"model{model_key}_kernel{settings_key}_batch{batch}.npy")

    def put(self, model_key: int, settings_key: int, batch: int, vectors: torch.Tensor) -> None:
        """Store one batch's ``(layers, T)`` packed kernels of one model."""
        path = self._path(model_key, settings_key, batch)
        partial = f"{path}.partial"
        with open(partial, "wb") as handle:
            np.save(handle, vectors.detach().to("cpu", torch.float64).numpy())
        os.replace(partial, path)

    def get(self, model_key: int, settings_key: int, batch: int) -> torch.Tensor:
        """Load what ``put`` stored for the same keys."""
        return torch.from_numpy(np.load(self._path(model_key, settings_key, batch)))
