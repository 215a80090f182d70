"""One way to write an output file: a temp sibling in the target folder, fsync, rename into place.

- Readers see the old file or the new one, never half of one; a failed write (full disk, GDAL error,
  crash) leaves the previous file exactly as it was and no temp file behind.
- Files and folders get ordinary permissions (0666 / 0777 less the umask), not ``mkstemp``'s 0600.
- Rasters are read back before the rename (``verify_raster``): GDAL reports some write failures (a
  full disk under a compressed GeoTIFF) only on stderr and closes cleanly, so the file itself is checked.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_permissions(path: str | Path, directory: bool = False) -> None:
    """chmod to what ``open``/``mkdir`` would have given under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on a clean exit it is synced, given ordinary permissions and renamed
    onto ``path``. Whatever the block raises, the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """``open(path, mode)`` through ``atomic_path``: the handle writes the temp file."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle
        handle.flush()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def make_staging_dir(parent: str | Path, prefix: str) -> Path:
    """A new hidden folder under ``parent`` (to fill, then rename into place) with ordinary permissions."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    ordinary_permissions(staging, directory=True)
    return staging


def verify_raster(path: str | Path, full: bool = True) -> None:
    """Read a just-written raster back (every block, or only the first and last); raises OSError if it cannot."""
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as src:
            windows = [window for _, window in src.block_windows(1)]
            for window in windows if full else {0: windows[0], 1: windows[-1]}.values():
                src.read(window=window)
    except RasterioError as exc:
        raise OSError(f"{path}: the raster just written cannot be read back (disk full?): {exc}") from None


def fsync_dir(folder: Path) -> None:
    """Best effort: make a folder's renames durable (some systems open or sync no folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
