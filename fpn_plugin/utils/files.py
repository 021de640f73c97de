"""
Files that appear complete or not at all, and names that stay inside their folder.

Every atomic writer here writes to a hidden temporary file in the destination's folder, then
renames it over the destination (``os.replace``, atomic on POSIX and Windows within one file
system). A crash, an exception or Ctrl-C leaves either the previous complete file or no file,
never a truncated one under the final name. A SIGKILL cannot run any clean-up, so it may leave
the hidden temporary file behind: :func:`remove_stale_temp_files` removes those, and every
command that writes into a folder calls it first.

Names derived from data (image ids, file names, dataset names) become file names only through
:func:`safe_file_stem`, so no data can point a write outside its folder.
"""
import contextlib
import json
import os
import re
import uuid
from typing import IO, Any, Iterator, List, Set

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "is_temp_file_name",
    "remove_stale_temp_files",
    "safe_file_stem",
    "temp_path_beside",
    "unique_file_stem",
]

# ".<final name>.<12 hex digits>.tmp": the only names remove_stale_temp_files touches.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
# Longest stem safe_file_stem returns (file systems allow 255 bytes; room for suffixes).
_MAX_STEM = 100


def temp_path_beside(path: str) -> str:
    """A fresh hidden name next to ``path`` (same folder, so the final rename is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")


def is_temp_file_name(name: str) -> bool:
    """Whether ``name`` (a base name) is one of :func:`temp_path_beside`'s names."""
    return bool(_TEMP_NAME.match(name))


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable; not possible (nor needed) on every platform."""
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


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """
    Open a hidden temporary file next to ``path``; when the block ends without an exception,
    rename it to ``path``. On an exception the temporary file is removed and ``path`` keeps
    what it held before.

    Args:
        mode (str): "wb" or "w" (text, UTF-8).
        durable (bool): also fsync the file and the folder, so the file survives a power
            loss or OS crash. Without it a crashed or interrupted *process* still never
            leaves a partial file under ``path``; only the OS-crash guarantee is dropped.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    tmp = temp_path_beside(path)
    try:
        # "x": never reuse a file; created with the umask's mode.
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb", durable) as f:
        f.write(data)


def atomic_write_json(path: str, obj: Any, durable: bool = True, **dump_kwargs) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``durable`` as in :func:`atomic_open`)."""
    atomic_write_bytes(path, json.dumps(obj, **dump_kwargs).encode("utf-8"), durable)


def remove_stale_temp_files(folder: str, recursive: bool = False) -> List[str]:
    """
    Remove the hidden temporary files that a killed writer left in ``folder``.

    Only names of the form ``.<name>.<12 hex digits>.tmp`` (those :func:`temp_path_beside`
    makes) are touched. Call it only where no other process is writing at the same time.

    Returns:
        list[str]: the removed paths.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    walk = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for root, _, files in walk:
        for name in files:
            path = os.path.join(root, name)
            if is_temp_file_name(name) and os.path.isfile(path) and not os.path.islink(path):
                remove_quietly(path)
                removed.append(path)
    return removed


def safe_file_stem(text: Any, fallback: str = "item") -> str:
    """
    A file-name stem made from ``text`` that names one file inside its folder: letters,
    digits, ``-``, ``_`` and inner dots only (no separators, no ``..``, no leading dot), at most
    100 characters. Anything else becomes ``_``; an empty result becomes ``fallback``.

    Examples: ``"img_1.png"`` -> ``"img_1.png"``, ``"q/../../X"`` -> ``"q_.._.._X"`` ->
    ``"q_._._X"``; ``".."`` -> ``fallback``.
    """
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(text))
    stem = re.sub(r"\.{2,}", ".", stem).strip(".")
    stem = stem[:_MAX_STEM].rstrip(".")
    return stem or fallback


def unique_file_stem(text: Any, used: Set[str], fallback: str = "item") -> str:
    """
    :func:`safe_file_stem`, made unique among ``used`` (compared case-insensitively, as some
    file systems do) by a ``_2``, ``_3``, ... suffix; the result is added to ``used``.
    """
    stem = safe_file_stem(text, fallback)
    candidate, k = stem, 1
    while candidate.lower() in used:
        k += 1
        candidate = f"{stem}_{k}"
    used.add(candidate.lower())
    return candidate
