"""
Writers of the export's files: a streamed JSON array and encoded images, each appearing
complete or not at all (the atomic primitives live in ``fpn_plugin.utils.files``).
"""
import json
import os
from typing import Any, Optional

import cv2
import numpy as np

from ..utils.files import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    remove_quietly,
    temp_path_beside,
)

__all__ = [
    "StreamingJSONArrayWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "encode_image",
    "write_image",
]


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
        self._tmp: Optional[str] = temp_path_beside(path)
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
            os.replace(self._tmp, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
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
            remove_quietly(self._tmp)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()
        return False
