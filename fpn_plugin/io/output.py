"""
The writing boundary: :class:`OutputFolder`, the one way the plugin writes files.

An output folder

- is a folder (an existing *file* at its path is refused, naming it) and is created with its
  parents when needed;
- hands out paths only inside itself: an absolute name, a ``..`` component, or a path that
  passes through a symlinked *subfolder* is refused (the folder itself may be a symlink the
  user made, e.g. to a scratch disk);
- writes atomically (``fpn_plugin.utils.files.atomic_open``: a crash leaves the previous
  file or none, and a symlinked *file* is replaced, never written through);
- records every file it wrote in a manifest (``.fpn_plugin_manifest.json``), so that
  :meth:`OutputFolder.clean` removes only files the plugin created, and
  :meth:`OutputFolder.require_own` refuses a folder that holds anything else (``--fresh``,
  dataset generation) instead of overwriting or deleting the user's files.
"""
import json
import os
from typing import Iterable, List, Optional, Set

from ..utils.files import atomic_open, is_temp_file_name, remove_quietly

__all__ = ["MANIFEST_NAME", "OutputFolder", "OutputFolderError"]

MANIFEST_NAME = ".fpn_plugin_manifest.json"
# Foreign files named in an error message (the rest are counted).
_NAMED = 5


class OutputFolderError(ValueError):
    """A write the output folder refuses: outside it, through a symlinked folder, onto a
    folder, into a path that is a file; or a folder holding files the plugin did not create
    where only its own may be (:meth:`OutputFolder.require_own`)."""


class OutputFolder:
    """
    A folder the plugin writes into (see the module docstring).

    Args:
        path (str): the folder; created with its parents unless ``create`` is False.
        create (bool): create it now.

    Raises:
        OutputFolderError: ``path`` is an existing file (or a symlink to one).
    """

    def __init__(self, path: str, *, create: bool = True):
        if not path:
            raise OutputFolderError("output folder: empty path")
        self.path = os.path.abspath(str(path))
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OutputFolderError(f"output folder {str(path)!r} is an existing file, not a "
                                    "folder; choose another output folder")
        self._created: Set[str] = set()
        if create:
            os.makedirs(self.path, exist_ok=True)
        self._created = self._read_manifest()

    # -- paths -----------------------------------------------------------------------------
    def _relative(self, name: str) -> str:
        name = str(name)
        if not name or os.path.isabs(name) or name.startswith("~"):
            raise OutputFolderError(f"output folder {self.path}: {name!r} is not a relative "
                                    "path inside it")
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise OutputFolderError(f"output folder {self.path}: {name!r} points outside it")
        if parts[-1] == MANIFEST_NAME:
            raise OutputFolderError(f"output folder {self.path}: {name!r} is its manifest")
        return "/".join(parts)

    def _check_folders(self, rel: str, create: bool) -> None:
        """Each folder between the root and ``rel``'s file is a real folder (not a symlink)."""
        current = self.path
        for part in rel.split("/")[:-1]:
            current = os.path.join(current, part)
            if os.path.islink(current):
                raise OutputFolderError(
                    f"output folder {self.path}: {current} is a symlink; refusing to write "
                    "through it (it could point anywhere)")
            if os.path.exists(current) and not os.path.isdir(current):
                raise OutputFolderError(f"output folder {self.path}: {current} is a file, "
                                        "not a folder")
            if create and not os.path.exists(current):
                os.mkdir(current)

    def file(self, name: str, create_folders: bool = True) -> str:
        """
        The absolute path of ``name`` (relative, e.g. ``"overlays/a.png"``) inside the folder,
        its parent folders created; checked as in the module docstring.
        """
        rel = self._relative(name)
        if create_folders:
            os.makedirs(self.path, exist_ok=True)
        self._check_folders(rel, create_folders)
        path = os.path.join(self.path, *rel.split("/"))
        if os.path.isdir(path):
            raise OutputFolderError(f"output folder {self.path}: {rel} is a folder, not a file")
        return path

    def subfolder(self, name: str) -> str:
        """A checked subfolder (created), e.g. for a writer that names its own files."""
        rel = self._relative(name)
        os.makedirs(self.path, exist_ok=True)
        self._check_folders(rel + "/_", create=True)  # checks and creates every folder of rel
        return os.path.join(self.path, *rel.split("/"))

    # -- writing ---------------------------------------------------------------------------
    def open(self, name: str, mode: str = "wb", durable: bool = True):
        """``atomic_open`` of ``name`` inside the folder; the file is recorded as created."""
        path = self.file(name)
        self.record(name)
        return atomic_open(path, mode, durable)

    def write_bytes(self, name: str, data: bytes, durable: bool = True) -> str:
        with self.open(name, "wb", durable) as f:
            f.write(data)
        return self.file(name)

    def write_text(self, name: str, text: str, durable: bool = True) -> str:
        with self.open(name, "w", durable) as f:
            f.write(text)
        return self.file(name)

    def write_json(self, name: str, obj, durable: bool = True, **dump_kwargs) -> str:
        return self.write_bytes(name, json.dumps(obj, **dump_kwargs).encode("utf-8"), durable)

    # -- the manifest ----------------------------------------------------------------------
    def _read_manifest(self) -> Set[str]:
        path = os.path.join(self.path, MANIFEST_NAME)
        if not os.path.isfile(path) or os.path.islink(path):
            return set()
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            files = data["files"]
            return {self._relative(name) for name in files if isinstance(name, str)}
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return set()  # unreadable: nothing is taken as ours, so nothing is deleted

    def _write_manifest(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        with atomic_open(os.path.join(self.path, MANIFEST_NAME), "w", durable=False) as f:
            json.dump({"files": sorted(self._created)}, f, indent=0)

    def record(self, *names: str) -> None:
        """Record files as created by the plugin (written here or by a library on its behalf)."""
        before = len(self._created)
        self._created.update(self._relative(n) for n in names)
        if len(self._created) != before:
            self._write_manifest()

    def created(self) -> Set[str]:
        """The recorded files (relative paths), whether or not they still exist."""
        return set(self._created)

    def files(self) -> List[str]:
        """Every file under the folder (relative paths; not the manifests nor temporaries: a
        subfolder written through its own OutputFolder, e.g. the demo's export, keeps its own
        manifest). Symlinked folders are listed as entries, never followed."""
        out = []
        if not os.path.isdir(self.path):
            return out
        for root, dirs, names in os.walk(self.path):
            rel_root = os.path.relpath(root, self.path)
            for d in list(dirs):
                if os.path.islink(os.path.join(root, d)):
                    dirs.remove(d)
                    names.append(d)
            for name in names:
                rel = name if rel_root == "." else f"{rel_root}/{name}".replace(os.sep, "/")
                if name == MANIFEST_NAME or is_temp_file_name(name):
                    continue
                out.append(rel)
        return sorted(out)

    def foreign_files(self) -> List[str]:
        """Files in the folder the plugin did not record as its own."""
        return [f for f in self.files() if f not in self._created]

    def adopt_new(self, before: Iterable[str]) -> List[str]:
        """
        Record every file present now but not in ``before`` (a :meth:`files` listing taken
        earlier): the files a library (Detectron2's trainer, a logger) wrote on the plugin's
        behalf during a run. Returns them.
        """
        before = set(before)
        new = [f for f in self.files() if f not in before and f not in self._created]
        if new:
            self.record(*new)
        return new

    def require_own(self, purpose: str) -> None:
        """
        Raise unless every file in the folder is one the plugin created.

        Raises:
            OutputFolderError: naming the folder, ``purpose`` and the first foreign files.
        """
        foreign = self.foreign_files()
        if foreign:
            shown = ", ".join(foreign[:_NAMED]) + (f" and {len(foreign) - _NAMED} more"
                                                   if len(foreign) > _NAMED else "")
            raise OutputFolderError(
                f"{purpose}: {self.path} holds files fpn_plugin did not create ({shown}); "
                "refusing to overwrite or delete them. Choose another folder, or move them away")

    def clean(self, names: Optional[Iterable[str]] = None) -> List[str]:
        """
        Remove the files the plugin created (all, or those of ``names``), then the folders
        they leave empty; never a file it did not create, never through a symlinked folder.

        Returns:
            list[str]: the removed files (relative paths).
        """
        targets = self._created if names is None else {self._relative(n) for n in names}
        removed = []
        for rel in sorted(targets & self._created):
            try:
                path = self.file(rel, create_folders=False)
            except OutputFolderError:
                continue  # a folder on its way became a symlink: leave it alone
            if os.path.lexists(path) and not os.path.isdir(path):
                remove_quietly(path)
                removed.append(rel)
            self._created.discard(rel)
        for rel in removed:
            folder = os.path.dirname(os.path.join(self.path, *rel.split("/")))
            while folder != self.path and os.path.isdir(folder) and not os.path.islink(folder):
                try:
                    os.rmdir(folder)  # only when empty
                except OSError:
                    break
                folder = os.path.dirname(folder)
        self._write_manifest()
        return removed
