"""On-disk store of per-batch arrays, so memory does not grow with the batch count."""

import os
import shutil
import tempfile

import numpy as np
import torch

from .atomic import atomic_path

__all__ = ["ScratchStore"]


class ScratchStore:
    """Per-batch arrays of a run, such as resized images, kept in a temporary folder.

    One ``.npy`` file per key. Files are written under a temporary name and renamed,
    so a reader never sees half a file. Use it as a context manager; leaving deletes
    the folder.

    Args:
        parent: folder in which to create the temporary folder; the system default
            when None.
    """

    def __init__(self, parent: str | None = None) -> None:
        self.parent = parent
        self.folder: str | None = None

    def __enter__(self) -> "ScratchStore":
        self.folder = tempfile.mkdtemp(prefix="cka_scratch_", dir=self.parent)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.npy")

    def __contains__(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def put(self, key: str, array: torch.Tensor) -> None:
        """Store a CPU copy of ``array`` under ``key``, a valid file name."""
        with atomic_path(self._path(key)) as partial, open(partial, "wb") as handle:
            np.save(handle, array.detach().cpu().numpy())

    def get(self, key: str) -> torch.Tensor:
        """Load what ``put`` stored under ``key``."""
        return torch.from_numpy(np.load(self._path(key)))
