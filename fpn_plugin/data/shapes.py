"""
The embedded demo dataset: synthetic instance segmentation of shapes, COCO format.

Each image has a textured, noisy background and 1 to 6 filled shapes (circles, rectangles,
triangles, stars) of random colour, rotation and size; shapes drawn later occlude earlier
ones, and every annotation is the polygon of its object's *visible* part. Object sizes span
more than a 4x range, so several pyramid levels get objects. Generation is deterministic in
``seed`` (per image, so a larger split starts with the same images as a smaller one).

The same generator makes a harder split (``SHAPES_HARD``, registered as ``shapes_hard_*``):
smaller objects (``object_size``), more of them (``max_instances``) and unannotated clutter
under them (``distractors``: rings, strokes and crosses that are no class). With the default
parameters the dataset is byte for byte what earlier versions generated.

``ensure_shapes_dataset`` writes ``<root>/<split>/*.jpg`` and ``<root>/<split>.json``, and
regenerates only when the files are missing or were made with other parameters;
``register_shapes_dataset`` makes the splits loadable by name through Detectron2's
``register_coco_instances``.
"""
import json
import logging
import math
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_util

# Object size is the side of its bounding square before rotation; the defaults (and the harder
# split's values) live with the config keys that expose them.
from ..io.output import OutputFolder
from .config import DEFAULT_MAX_INSTANCES, DEFAULT_OBJECT_SIZE, SHAPES_HARD

__all__ = [
    "SHAPE_CLASSES",
    "SHAPES_HARD",
    "ensure_shapes_dataset",
    "register_shapes_dataset",
    "register_shapes_from_config",
    "register_shapes_if_named",
    "generate_shapes_image",
    "shapes_training_input",
]

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "rectangle", "triangle", "star")
# The names configs use for the embedded dataset (register_shapes_from_config): the default
# split's, then the harder split's (keys under DATASETS.SHAPES.HARD).
SHAPES_DATASET_NAMES = ("shapes_train", "shapes_val", "shapes_hard_train", "shapes_hard_val")
_HARD_PREFIX = "shapes_hard"
# Bumped whenever generation changes, so stale datasets on disk are rebuilt.
_GENERATOR_VERSION = 2
_SPLIT_IDS = {"train": 0, "val": 1}

# An object must keep this fraction of its area visible, or the scene is re-drawn without it.
_MIN_VISIBLE_FRAC = 0.5
# Visible fragments smaller than this (pixels) are not annotated (nor are they meaningful).
_MIN_FRAGMENT_AREA = 12


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def _shape_outline(kind: str, center, size: float, angle: float, rng) -> np.ndarray:
    """Vertices (K, 2) in pixels (x, y) of one shape; circles are returned as fine polygons."""
    cx, cy = center
    r = size / 2.0
    if kind == "circle":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "rectangle":
        aspect = rng.uniform(0.45, 1.0)  # squares and bars; the longer side is `size`
        w, h = r, r * aspect
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    elif kind == "triangle":
        # Vertices jittered around an equilateral triangle: varied but never degenerate.
        t = np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "star":
        n = int(rng.integers(5, 7))
        inner = rng.uniform(0.4, 0.55)
        t = np.arange(2 * n) * math.pi / n
        radius = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner) * r
        pts = np.stack([np.cos(t) * radius, np.sin(t) * radius], 1)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot.T + np.array([cx, cy])


def _fill(mask_shape, outline: np.ndarray) -> np.ndarray:
    """Rasterize a polygon with sub-pixel vertex precision into a bool mask."""
    shift = 4  # cv2 fixed-point: vertices in 1/16 pixel
    mask = np.zeros(mask_shape, np.uint8)
    pts = np.round((outline - 0.5) * (1 << shift)).astype(np.int32)  # COCO: pixel i covers [i, i+1)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=shift)
    return mask.astype(bool)


def _has_hole(mask: np.ndarray) -> bool:
    """Whether filling the outer contours of ``mask`` adds pixels (it encloses background)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return int(filled.sum()) > int(mask.sum())


def _draw_distractors(img: np.ndarray, count: int, object_size, rng) -> None:
    """
    Paint ``count`` unannotated clutter items into ``img`` (H, W, 3) float, in place: rings,
    straight strokes and crosses, sized like the objects. None of them is a filled shape of
    a class, so a detector must learn to ignore them rather than being taught wrong labels.
    """
    size = img.shape[0]
    lo, hi = object_size
    for _ in range(count):
        kind = int(rng.integers(0, 3))
        side = size * math.exp(rng.uniform(math.log(lo), math.log(hi)))
        center = rng.uniform(0, size, 2)
        width = int(rng.integers(1, 3))
        layer = np.zeros((size, size), np.uint8)
        cx, cy = (int(round(v)) for v in center)
        r = max(int(round(side / 2)), 2)
        if kind == 0:  # an outline circle: a ring, never a filled disc
            cv2.circle(layer, (cx, cy), max(r, 4), 1, thickness=1)
        else:
            a = rng.uniform(0, math.pi)
            dx, dy = int(round(r * math.cos(a))), int(round(r * math.sin(a)))
            cv2.line(layer, (cx - dx, cy - dy), (cx + dx, cy + dy), 1, thickness=width)
            if kind == 2:  # a cross: a second stroke at right angles
                cv2.line(layer, (cx + dy, cy - dx), (cx - dy, cy + dx), 1, thickness=width)
        img[layer.astype(bool)] = _random_color(rng)


def _random_color(rng) -> np.ndarray:
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(60, 256), rng.integers(60, 256)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _background(size: int, rng) -> np.ndarray:
    """A (H, W, 3) float image: gradient, stripes or blotches, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0 = _random_color(rng)
    # The texture's second colour stays near the first: objects, not stripes, should stand out.
    c1 = np.clip(c0 + rng.uniform(-60, 60, 3), 0, 255).astype(np.float32)
    style = rng.integers(0, 3)
    if style == 0:  # linear gradient between two colours
        a = rng.uniform(0, 2 * math.pi)
        # float32 factors: numpy 2 would otherwise compute in float64 (NEP 50) and change pixels.
        t = (np.float32(np.cos(a)) * xx + np.float32(np.sin(a)) * yy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif style == 1:  # soft stripes
        a = rng.uniform(0, math.pi)
        freq = rng.uniform(3, 10)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (np.float32(np.cos(a)) * xx
                                                     + np.float32(np.sin(a)) * yy))
    else:  # low-frequency blotches
        coarse = rng.uniform(0, 1, (6, 6)).astype(np.float32)
        t = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, rng.uniform(3, 10), (size, size, 3))
    return img


def generate_shapes_image(size: int, rng, classes: Sequence[str] = SHAPE_CLASSES,
                          max_instances: int = DEFAULT_MAX_INSTANCES,
                          object_size: Tuple[float, float] = DEFAULT_OBJECT_SIZE,
                          distractors: int = 0) -> Tuple[np.ndarray, List[Dict]]:
    """
    Draw one image and its instances.

    Args:
        size (int): image side in pixels (images are square).
        rng (np.random.Generator): the only source of randomness.
        classes: shape names to draw from (a subset of ``SHAPE_CLASSES``).
        max_instances (int): at most this many objects (at least 1).
        object_size (tuple[float, float]): smallest and largest object side as fractions of
            ``size``; sides are log-uniform in between.
        distractors (int): at most this many unannotated clutter items (uniform in
            [0, distractors]), painted before the objects so they never hide one.

    Returns:
        image (np.ndarray): (size, size, 3) uint8 RGB.
        instances (list[dict]): per visible object, in drawing order: ``category`` (index into
        ``classes``) and ``mask`` (size, size) bool of its visible pixels.
    """
    img = _background(size, rng)
    if distractors:  # no draw at all without clutter: the default images stay as they were
        _draw_distractors(img, int(rng.integers(0, distractors + 1)), object_size, rng)
    num = int(rng.integers(1, max_instances + 1))
    objects = []  # (class index, full mask, colour)
    for _ in range(num):
        for _attempt in range(20):
            cls = int(rng.integers(0, len(classes)))
            # Log-uniform sizes, so small and large objects are equally common.
            side = size * math.exp(rng.uniform(math.log(object_size[0]), math.log(object_size[1])))
            margin = side * 0.3  # may be cut by the border a little
            center = rng.uniform(side / 2 - margin, size - side / 2 + margin, 2)
            outline = _shape_outline(classes[cls], center, side, rng.uniform(0, 2 * math.pi), rng)
            full = _fill((size, size), outline)
            if full.sum() < _MIN_FRAGMENT_AREA * 4:
                continue
            # Keep every earlier object (and this one) sufficiently visible.
            ok = full.sum() > 0
            for _, prev_full, _, prev_vis in objects:
                vis = prev_vis & ~full
                # COCO polygons cannot express holes: an object may not sit inside another.
                if vis.sum() < _MIN_VISIBLE_FRAC * prev_full.sum() or _has_hole(vis):
                    ok = False
                    break
            if not ok:
                continue
            color = _random_color(rng)
            # Contrast with what lies beneath, otherwise the object is invisible by construction.
            if np.abs(img[full].mean(0) - color).max() < 70:
                continue
            objects = [(c, f, col, v & ~full) for c, f, col, v in objects]
            objects.append((cls, full, color, full.copy()))
            break
    for _, full, color, _ in objects:
        # Per-object shading: a mild linear ramp, so colour alone is not a perfect cue.
        yy, xx = np.nonzero(full)
        ramp = ((xx - xx.mean()) * rng.uniform(-1, 1) + (yy - yy.mean()) * rng.uniform(-1, 1))
        ramp = ramp / max(np.abs(ramp).max(), 1.0) * rng.uniform(0, 20)
        img[yy, xx] = color + ramp[:, None]
    img += rng.normal(0, rng.uniform(2, 6), img.shape)  # sensor noise over everything
    image = np.clip(img, 0, 255).astype(np.uint8)
    instances = [{"category": c, "mask": v} for c, _, _, v in objects]
    return image, instances


def _mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons (absolute x, y, pixel edges at integers) of a bool mask's components."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polys = []
    for contour in contours:
        if cv2.contourArea(contour) < _MIN_FRAGMENT_AREA:
            continue
        contour = cv2.approxPolyDP(contour, 0.6, True).reshape(-1, 2).astype(np.float64)
        if len(contour) < 3:
            continue
        # Contours run through boundary pixel centres; those sit at +0.5 in COCO coordinates.
        polys.append([round(float(v), 2) for v in (contour + 0.5).reshape(-1)])
    return polys


# ---------------------------------------------------------------------------------------------
# Dataset files
# ---------------------------------------------------------------------------------------------
def _params(split, num, image_size, seed, classes, max_instances, object_size, distractors):
    params = {"generator_version": _GENERATOR_VERSION, "split": split, "num_images": num,
              "image_size": image_size, "seed": seed, "classes": list(classes),
              "max_instances": max_instances}
    # Recorded only when not the default, so files written before these parameters existed
    # stay current (and byte-identical); any other value is part of the key and regenerates.
    if tuple(object_size) != DEFAULT_OBJECT_SIZE:
        params["object_size"] = [float(v) for v in object_size]
    if distractors:
        params["distractors"] = distractors
    return params


def _is_current(json_path: str, image_dir: str, params: dict) -> bool:
    try:
        with open(json_path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    if data.get("info", {}).get("fpn_plugin_shapes") != params:
        return False
    return all(os.path.isfile(os.path.join(image_dir, im["file_name"])) for im in data["images"])


_IMAGE_NAME = re.compile(r"^\d{6}\.jpg$")


def _claim_root(folder: OutputFolder) -> None:
    """
    Before generating into ``folder``: take over the files of a shapes dataset generated
    before the output folder kept a manifest (a ``<split>.json`` carrying the generator's
    parameters and its ``<split>/NNNNNN.jpg`` images), then refuse the folder if it still
    holds any file the plugin did not create (a user's own dataset is never overwritten).
    """
    for split in _SPLIT_IDS:
        json_path = os.path.join(folder.path, f"{split}.json")
        if f"{split}.json" in folder.created() or not os.path.isfile(json_path):
            continue
        try:
            with open(json_path, encoding="utf-8") as f:
                ours = "fpn_plugin_shapes" in json.load(f).get("info", {})
        except (OSError, ValueError, AttributeError, RecursionError):
            ours = False
        if not ours:
            continue
        image_dir = os.path.join(folder.path, split)
        names = [f"{split}/{n}" for n in (os.listdir(image_dir) if os.path.isdir(image_dir)
                                          and not os.path.islink(image_dir) else [])
                 if _IMAGE_NAME.match(n)]
        folder.record(f"{split}.json", *names)
    folder.require_own("generating the shapes dataset (DATASETS.SHAPES.ROOT)")


def _generate_split(split, num, image_size, seed, classes, max_instances, object_size,
                    distractors, folder: OutputFolder, log_every: float = 5.0):
    # The split's previous files (ours: recorded in the manifest) go first, so no stale
    # image of a larger earlier split stays behind; the JSON written last means "complete".
    folder.clean([f for f in folder.created() if f == f"{split}.json" or f.startswith(f"{split}/")])
    folder.subfolder(split)
    images, annotations = [], []
    start = last_log = time.perf_counter()
    for idx in range(num):
        rng = np.random.default_rng([seed, _SPLIT_IDS.get(split, 99), idx])
        image, instances = generate_shapes_image(image_size, rng, classes, max_instances,
                                                 object_size, distractors)
        file_name = f"{idx:06d}.jpg"
        ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise OSError(f"could not encode {split}/{file_name}")
        folder.write_bytes(f"{split}/{file_name}", encoded.tobytes(), durable=False)
        image_id = idx + 1
        images.append({"id": image_id, "file_name": file_name,
                       "height": image_size, "width": image_size})
        for inst in instances:
            polys = _mask_to_polygons(inst["mask"])
            if not polys:
                continue
            rle = mask_util.merge(mask_util.frPyObjects(polys, image_size, image_size))
            x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": inst["category"] + 1, "segmentation": polys,
                "area": float(mask_util.area(rle)), "bbox": [x, y, w, h], "iscrowd": 0,
            })
        now = time.perf_counter()
        if now - last_log >= log_every or idx + 1 == num:
            last_log = now
            eta = (now - start) / (idx + 1) * (num - idx - 1)
            logger.info(f"shapes {split}: {idx + 1}/{num} images, ETA {eta:.0f} s")
    data = {
        "info": {"description": "fpn_plugin synthetic shapes",
                 "fpn_plugin_shapes": _params(split, num, image_size, seed, classes, max_instances,
                                              object_size, distractors)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(classes)],
    }
    # The JSON appears last and whole: its presence means "complete".
    folder.write_json(f"{split}.json", data)


def ensure_shapes_dataset(root: str, num_train: int = 400, num_val: int = 100,
                          image_size: int = 256, seed: int = 0,
                          classes: Sequence[str] = SHAPE_CLASSES,
                          max_instances: int = DEFAULT_MAX_INSTANCES,
                          object_size: Sequence[float] = DEFAULT_OBJECT_SIZE,
                          distractors: int = 0) -> Dict[str, Tuple[str, str]]:
    """
    Generate the shapes dataset under ``root`` unless an identical one is already there.

    Args:
        root (str): output folder; gets ``train/``, ``val/`` (JPEG images) and
            ``train.json``, ``val.json`` (COCO instances, polygon masks, category ids from 1).
        num_train, num_val (int): images per split (>= 1).
        image_size (int): square image side in pixels (>= 32).
        seed (int): the dataset is a pure function of the parameters and the seed; train and
            val use disjoint random streams, so val is held out.
        classes: shape names, a non-empty subset of ``SHAPE_CLASSES`` (order = category ids).
        max_instances (int): objects per image are uniform in [1, max_instances].
        object_size (tuple[float, float]): smallest and largest object side as fractions of
            ``image_size``, 0 < min <= max <= 1 (log-uniform in between).
        distractors (int): unannotated clutter items per image are uniform in
            [0, distractors] (0: none, the default).

    Returns:
        dict: split name ("train", "val") -> (json_path, image_dir).

    Raises:
        OutputFolderError (a ValueError): ``root`` is a file, or holds files fpn_plugin did not
            create (a user's own dataset is never overwritten; see ``fpn_plugin.io.OutputFolder``).
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if not classes or any(c not in SHAPE_CLASSES for c in classes):
        raise ValueError(f"classes must be a non-empty subset of {SHAPE_CLASSES}, got {classes}")
    if max_instances < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}")
    object_size = tuple(object_size)
    if len(object_size) != 2 or not 0 < object_size[0] <= object_size[1] <= 1:
        raise ValueError(f"object_size must be (min, max) with 0 < min <= max <= 1, "
                         f"got {object_size}")
    if distractors < 0:
        raise ValueError(f"distractors must be >= 0, got {distractors}")
    out = {}
    folder = None
    for split, num in (("train", num_train), ("val", num_val)):
        if num < 1:
            raise ValueError(f"num_{split} must be >= 1, got {num}")
        json_path = os.path.join(root, f"{split}.json")
        image_dir = os.path.join(root, split)
        params = _params(split, num, image_size, seed, classes, max_instances, object_size,
                         distractors)
        if not _is_current(json_path, image_dir, params):
            if folder is None:
                folder = OutputFolder(root)
                _claim_root(folder)
            logger.info(f"Generating shapes {split} split ({num} images, {image_size} px) in {root}")
            _generate_split(split, num, image_size, seed, classes, max_instances, object_size,
                            distractors, folder)
        out[split] = (json_path, image_dir)
    return out


def register_shapes_dataset(root: str, prefix: str = "shapes", **kwargs) -> List[str]:
    """
    Ensure the dataset exists (see ``ensure_shapes_dataset``) and register its splits.

    Args:
        root (str): dataset folder.
        prefix (str): names become ``<prefix>_train`` and ``<prefix>_val``.
        kwargs: passed to ``ensure_shapes_dataset``.

    Returns:
        list[str]: the registered dataset names, train first. Registering a name that is
        already registered with the same files is a no-op; with other files, an error.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    splits = ensure_shapes_dataset(root, **kwargs)
    names = []
    for split, (json_path, image_dir) in splits.items():
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (getattr(meta, "json_file", None) != json_path
                    or getattr(meta, "image_root", None) != image_dir):
                raise ValueError(
                    f"dataset {name!r} is already registered with other files "
                    f"({getattr(meta, 'json_file', None)}); pick another prefix")
        else:
            register_coco_instances(name, {}, json_path, image_dir)
        names.append(name)
    return names


def _check_difficulty_keys(node, prefix: str) -> Dict[str, object]:
    """``ensure_shapes_dataset``'s difficulty arguments from ``node``; errors name the key."""
    size = node.OBJECT_SIZE
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in size)
            or not 0 < size[0] <= size[1] <= 1):
        raise ValueError(f"{prefix}.OBJECT_SIZE must be [min, max] fractions of the image side "
                         f"with 0 < min <= max <= 1, got {size!r}")
    for key, minimum in (("MAX_INSTANCES", 1), ("DISTRACTORS", 0)):
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{prefix}.{key} must be an integer >= {minimum}, got {value!r}")
    return {"object_size": tuple(float(v) for v in size), "max_instances": node.MAX_INSTANCES,
            "distractors": node.DISTRACTORS}


def register_shapes_from_config(cfg, dataset_names: Optional[Sequence[str]] = None) -> List[str]:
    """
    ``register_shapes_dataset`` with the parameters in ``cfg.DATASETS.SHAPES``: the default
    split as "shapes_train" / "shapes_val" (ROOT, NUM_TRAIN, NUM_VAL, IMAGE_SIZE, SEED,
    OBJECT_SIZE, MAX_INSTANCES, DISTRACTORS), the harder split as "shapes_hard_train" /
    "shapes_hard_val" (``DATASETS.SHAPES.HARD``: its own ROOT, OBJECT_SIZE, MAX_INSTANCES,
    DISTRACTORS; the sizes and SEED are shared).

    Args:
        dataset_names: the names wanted (default: ``DATASETS.TRAIN`` + ``DATASETS.TEST``); the
            splits they name are registered, the default split if they name none.

    Raises:
        ValueError: naming the ``DATASETS.SHAPES.*`` key whose value is unusable.
    """
    s = cfg.DATASETS.SHAPES
    checks = [("NUM_TRAIN", s.NUM_TRAIN, 1), ("NUM_VAL", s.NUM_VAL, 1),
              ("IMAGE_SIZE", s.IMAGE_SIZE, 32), ("SEED", s.SEED, 0)]
    for key, value, minimum in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"DATASETS.SHAPES.{key} must be an integer >= {minimum}, got {value!r}")
    if dataset_names is None:
        dataset_names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    wanted = {n for n in dataset_names if n in SHAPES_DATASET_NAMES}
    hard = any(n.startswith(_HARD_PREFIX) for n in wanted)
    default = not hard or any(not n.startswith(_HARD_PREFIX) for n in wanted)
    splits = []  # (key prefix, node, registered-name prefix)
    if default:
        splits.append(("DATASETS.SHAPES", s, "shapes"))
    if hard:
        splits.append(("DATASETS.SHAPES.HARD", s.HARD, _HARD_PREFIX))
    plans = []
    for key_prefix, node, name_prefix in splits:  # every key checked before anything is written
        if not isinstance(node.ROOT, str) or not node.ROOT:
            raise ValueError(f"{key_prefix}.ROOT must be a folder path, got {node.ROOT!r}")
        plans.append((node.ROOT, name_prefix, _check_difficulty_keys(node, key_prefix)))
    names = []
    for root, name_prefix, difficulty in plans:
        names += register_shapes_dataset(root, prefix=name_prefix, num_train=s.NUM_TRAIN,
                                         num_val=s.NUM_VAL, image_size=s.IMAGE_SIZE,
                                         seed=s.SEED, **difficulty)
    return names


def register_shapes_if_named(cfg, dataset_names: Sequence[str]) -> bool:
    """
    ``register_shapes_from_config`` when ``dataset_names`` include names of the embedded
    dataset (``SHAPES_DATASET_NAMES``) that are not registered yet and ``cfg`` has the
    plugin's ``DATASETS.SHAPES`` keys (the split is generated if missing). A name the user
    registered themselves is left alone.

    Returns:
        bool: whether the shapes dataset was registered by this call.
    """
    from detectron2.data import DatasetCatalog

    registered = DatasetCatalog.list()
    wanted = [n for n in dataset_names if n in SHAPES_DATASET_NAMES and n not in registered]
    if not wanted or "SHAPES" not in cfg.DATASETS:
        return False
    register_shapes_from_config(cfg, wanted)
    return True


def shapes_training_input(size: int, seed: int) -> Dict:
    """
    One model input for training, drawn in memory by :func:`generate_shapes_image` (no files):
    what Detectron2's ``DatasetMapper`` would make of a shapes record at its own size, for
    tests and benchmarks that need realistic batches without a dataset on disk.

    Returns:
        dict: ``image`` (3, size, size) float32 BGR 0-255, ``height``, ``width``, and
        ``instances`` (``Instances`` with ``gt_boxes``, ``gt_classes``, ``gt_masks`` as
        ``BitMasks``).
    """
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    image, objects = generate_shapes_image(size, np.random.default_rng(seed))
    masks = np.stack([o["mask"] for o in objects])
    boxes = []
    for m in masks:
        yy, xx = np.nonzero(m)
        boxes.append([xx.min(), yy.min(), xx.max() + 1, yy.max() + 1])
    instances = Instances((size, size))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.gt_classes = torch.tensor([o["category"] for o in objects], dtype=torch.int64)
    instances.gt_masks = BitMasks(torch.from_numpy(masks))
    bgr = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))
    return {"image": torch.from_numpy(bgr).float(), "height": size, "width": size,
            "instances": instances}
