"""
Files that appear complete or not at all.

Every writer here writes to a hidden temporary file in the destination's folder, then renames
it over the destination (``os.replace``, atomic on POSIX and Windows within one file system).
A crash, an exception or Ctrl-C leaves either the previous complete file or no file, never a
truncated one under the final name. By default the file and folder are also fsynced, so the
result survives a power loss too.
"""
import json
import os
import uuid
from typing import Any, Optional

import cv2
import numpy as np

__all__ = [
    "StreamingJSONArrayWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "encode_image",
    "write_image",
]


def _temp_path_beside(path: str) -> str:
    """A fresh hidden name next to ``path`` (same folder, so the final rename is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")


def _fsync_dir(folder: str) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
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


def _commit(tmp: str, path: str) -> None:
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    """
    Write ``data`` to ``path`` atomically (temp file in the same folder, rename).

    Args:
        durable (bool): also fsync the file and the folder, so the file survives a power
            loss or OS crash. Without it, a crashed or interrupted *process* still never
            leaves a partial file under ``path``; only the OS crash guarantee is dropped,
            which saves two syncs per file when writing many small ones.
    """
    tmp = _temp_path_beside(path)
    try:
        with open(tmp, "xb") as f:  # "x": never reuse a file; created with the umask's mode
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if durable:
            _commit(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_json(path: str, obj: Any, durable: bool = True, **dump_kwargs) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``durable`` as in atomic_write_bytes)."""
    atomic_write_bytes(path, json.dumps(obj, **dump_kwargs).encode("utf-8"), durable)


def encode_image(image: np.ndarray, ext: str) -> bytes:
    """
    Encode an image to bytes with OpenCV.

    Args:
        image (np.ndarray): (H, W) uint8/uint16, or (H, W, 3) uint8 in BGR order.
        ext (str): ".png" (lossless; 16-bit kept) or ".jpg".
    """
    ok, buf = cv2.imencode(ext, image)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.dtype} image of shape "
                         f"{image.shape} as {ext}")
    return buf.tobytes()


def write_image(path: str, image: np.ndarray, durable: bool = True) -> None:
    """Encode ``image`` by the extension of ``path`` and write it atomically."""
    atomic_write_bytes(path, encode_image(image, os.path.splitext(path)[1].lower()), durable)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class StreamingJSONArrayWriter:
    """
    Write a JSON array record by record, committing it atomically when closed.

    Records go to disk as they are written (memory stays flat however many there are); the
    array only appears under ``path`` once :meth:`close` succeeds. Used as a context manager,
    an exception (including ``KeyboardInterrupt``) discards the partial file and leaves any
    previous ``path`` untouched.

    Example::

        with StreamingJSONArrayWriter("results.json") as w:
            for record in records:
                w.write(record)
    """

    def __init__(self, path: str):
        self.path = path
        self.count = 0
        self._tmp: Optional[str] = _temp_path_beside(path)
        self._file = open(self._tmp, "x", encoding="utf-8")
        self._file.write("[")

    @property
    def temp_path(self) -> Optional[str]:
        """The partial file being written (None once committed or discarded)."""
        return self._tmp

    def write(self, record: Any) -> None:
        """Append one JSON-serializable record."""
        if self._tmp is None:
            raise ValueError(f"{self.path}: writer already closed")
        # Serialize first so a record that fails to serialize never leaves half a record.
        text = json.dumps(record)
        self._file.write(("," if self.count else "") + "\n" + text)
        self.count += 1

    def close(self) -> None:
        """Finish the array, fsync and rename it to ``path``."""
        if self._tmp is None:
            return
        try:
            self._file.write("\n]\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            _commit(self._tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self._tmp = None

    def discard(self) -> None:
        """Drop the partial file; ``path`` keeps whatever it held before."""
        if self._tmp is None:
            return
        try:
            self._file.close()
        finally:
            _remove_quietly(self._tmp)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()
        return False
