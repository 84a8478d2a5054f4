"""Writing files so that no reader ever sees half of one."""

import contextlib
import os
import tempfile

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path``, renamed to ``path`` when the block succeeds.

    The temporary name is unique, so processes writing the same file, also on other
    machines sharing the folder, never write into each other's temporary file. On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
    os.close(handle)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
