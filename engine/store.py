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

    Arrays stay in memory until they reach ``memory_bytes``, and the rest go to one
    ``.npy`` file per key. Files are written under a temporary name and renamed, so a
    reader never sees half a file. Use it as a context manager. Leaving deletes the
    folder and forgets the arrays.

    Args:
        parent: folder in which to create the temporary folder; the system default
            when None.
        memory_bytes: how many bytes of arrays to keep in memory.
    """

    def __init__(self, parent: str | None = None, memory_bytes: int = 32 << 20) -> None:
        self.parent = parent
        self.folder: str | None = None
        self._memory: dict[str, torch.Tensor] = {}
        self._memory_left = memory_bytes

    def __enter__(self) -> "ScratchStore":
        self.folder = tempfile.mkdtemp(prefix="cka_scratch_", dir=self.parent)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self._memory.clear()

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.npy")

    def __contains__(self, key: str) -> bool:
        return key in self._memory or os.path.exists(self._path(key))

    def put(self, key: str, array: torch.Tensor) -> None:
        """Store a CPU copy of ``array`` under ``key``, a valid file name."""
        copy = array.detach().cpu().clone()
        if key in self._memory:
            self._memory_left += self._memory.pop(key).nbytes
        if copy.nbytes <= self._memory_left and not os.path.exists(self._path(key)):
            self._memory[key] = copy
            self._memory_left -= copy.nbytes
            return
        with atomic_path(self._path(key)) as partial, open(partial, "wb") as handle:
            np.save(handle, copy.numpy())

    def get(self, key: str) -> torch.Tensor:
        """Load a copy of what ``put`` stored under ``key``."""
        if key in self._memory:
            return self._memory[key].clone()
        return torch.from_numpy(np.load(self._path(key)))
