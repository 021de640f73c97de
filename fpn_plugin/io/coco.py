"""
COCO instance files read as untrusted data, before Detectron2 or pycocotools sees them.

:func:`read_coco_json` parses the file (a nesting too deep for Python's parser is an error
naming the file, not a ``RecursionError``) and checks the shape every loader relies on, raising
:class:`CocoSchemaError` naming the file and the element: an object with ``images``,
``annotations`` and ``categories`` lists; categories present, each an object with an integer
``id`` and a string ``name``, ids unique. Problems of single images and annotations (sizes,
boxes, ids, polygons) are not fatal: ``fpn_plugin.data.coco_json.scan_coco_json`` reports them
per record (the ``DATALOADER.INVALID_RECORDS`` policy skips or refuses them), using the
checks here (:func:`image_entry_problem`, :func:`bbox_problem`, :func:`resolve_image_path`).
"""
import json
import math
import os
from typing import Any, Optional

__all__ = ["CocoSchemaError", "ImagePathError", "bbox_problem", "image_entry_problem",
           "read_coco_json", "resolve_image_path"]


class CocoSchemaError(ValueError):
    """A COCO file that is missing, not JSON, or not shaped like a COCO instances file."""


class ImagePathError(ValueError):
    """An image ``file_name`` that points outside its image root."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def read_coco_json(json_file: str) -> dict:
    """
    The parsed COCO file, its file-level shape checked (see the module docstring).

    Raises:
        CocoSchemaError: naming the file and what is wrong.
    """
    if not os.path.isfile(json_file):
        raise CocoSchemaError(f"COCO annotation file not found: {json_file!r}")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CocoSchemaError(f"COCO annotation file {json_file!r} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise CocoSchemaError(f"COCO annotation file {json_file!r} is nested too deeply to be "
                              "a COCO file") from e
    except OSError as e:
        raise CocoSchemaError(f"COCO annotation file {json_file!r} cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise CocoSchemaError(f"COCO annotation file {json_file!r} holds a {type(data).__name__}, "
                              "not an object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise CocoSchemaError(f"COCO annotation file {json_file!r}: '{key}' is not a list")
    categories = data.get("categories") or []
    if not categories:
        raise CocoSchemaError(f"COCO annotation file {json_file!r} has no categories (a list of "
                              "{'id': int, 'name': str} objects is needed to name the classes)")
    seen = set()
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise CocoSchemaError(f"COCO annotation file {json_file!r}: categories[{i}] has no "
                                  f"integer 'id' ({cat!r:.80})")
        if not isinstance(cat.get("name"), str):
            raise CocoSchemaError(f"COCO annotation file {json_file!r}: category id {cat['id']} "
                                  "has no string 'name'")
        if cat["id"] in seen:
            raise CocoSchemaError(f"COCO annotation file {json_file!r}: category id {cat['id']} "
                                  "appears twice")
        seen.add(cat["id"])
    return data


def image_entry_problem(image: dict) -> Optional[str]:
    """Why an ``images`` entry cannot be loaded (no positive integer size), or None."""
    for key in ("height", "width"):
        if key not in image:
            return f"image entry without '{key}'"
        value = image[key]
        if not _is_int(value) or value <= 0:
            return f"image {key} {value!r} is not a positive integer"
    return None


def bbox_problem(bbox: Any) -> Optional[str]:
    """Why an annotation's ``bbox`` is unusable (not 4 finite numbers, width or height <= 0)."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return f"bbox {bbox!r:.80} is not [x, y, width, height]"
    if not all(_is_number(v) for v in bbox):
        return f"bbox {bbox!r:.80} holds a value that is not a finite number"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"degenerate bbox {bbox!r}: width or height <= 0"
    return None


def resolve_image_path(image_root: str, file_name: Any, allow_outside: bool = False) -> str:
    """
    ``image_root/file_name``, refused when ``file_name`` is absolute or climbs out of the
    root with ``..`` unless ``allow_outside`` (symlinks the user put in the root are followed,
    as a shared image store often is).

    Raises:
        ImagePathError: naming the file name and the root.
    """
    if not isinstance(file_name, str) or not file_name:
        raise ImagePathError(f"image file_name {file_name!r} is not a file name")
    path = os.path.join(image_root, file_name)
    if allow_outside:
        return path
    if os.path.isabs(file_name) or ".." in file_name.replace("\\", "/").split("/"):
        raise ImagePathError(
            f"image file_name {file_name!r} points outside the image root {image_root!r} "
            "(absolute, or with '..'); set the dataset's metadata images_outside_root=True to allow it")
    return path
