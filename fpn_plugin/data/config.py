"""Config keys of fpn_plugin.data: dataset-record validation before training (every config),
the embedded shapes dataset (the configs that use it)."""
from typing import Mapping, Sequence

from ..utils.config import add_missing_keys
from .images import DEFAULT_MAX_IMAGE_PIXELS

# Accepted values of DATALOADER.INVALID_RECORDS.
INVALID_RECORD_POLICIES = ("skip", "error")

# The shapes dataset's difficulty (fpn_plugin.data.shapes). Object side range as fractions of
# the image side: 0.1-0.5 spans 5x, at 256 px 26-128 px objects, so strides 4 to 32 all matter.
DEFAULT_OBJECT_SIZE = (0.1, 0.5)
DEFAULT_MAX_INSTANCES = 6
# The harder split: objects about 3x smaller (at 128 px, 9-32 px: mostly strides 4-8), up to
# twice as many, and clutter. Chosen with benchmarks/bench_variants.py (docs/variants.md).
SHAPES_HARD = {"object_size": (0.07, 0.25), "max_instances": 12, "distractors": 8}


def add_data_config(cfg):
    """
    Add fpn_plugin.data's keys to ``cfg`` (in place).

    Keys (all under ``cfg.DATALOADER``):

    - ``INVALID_RECORDS`` (default ``"skip"``): what the plugin's trainer does, before training
      starts, with dataset records that would fail midway or train on garbage (missing or
      unreadable image, image size different from the record's, degenerate or non-finite
      box, degenerate polygon, category outside the dataset's classes). ``"skip"``: drop the
      whole image record, log each problem with its file and image id, write the list to
      ``<OUTPUT_DIR>/invalid_records.json`` and report the count as
      ``data/invalid_records_skipped`` in the metrics. ``"error"``: refuse to start, with a
      ``ValueError`` listing the problems.
    - ``CHECK_IMAGES`` (default ``True``): whether the validation opens every image file (its
      header only) to check that it exists, decodes, is not truncated (JPEG/PNG end marker),
      is within ``INPUT.MAX_IMAGE_PIXELS`` and has the record's size. Turning it off saves
      start-up time on huge datasets whose files are known to be good.

    And ``cfg.INPUT.MAX_IMAGE_PIXELS`` (default 89,478,485, PIL's decompression-bomb
    threshold; 0: no limit): an image whose header declares more pixels is refused before it
    is decoded, by the validation, the training and evaluation loaders and the mask export.

    The embedded shapes dataset's keys are not added here: :func:`add_shapes_config` adds
    them to the configs that use that dataset (the demo's, the benchmarks').
    """
    cfg.DATALOADER.INVALID_RECORDS = "skip"
    cfg.DATALOADER.CHECK_IMAGES = True
    cfg.INPUT.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS


def add_shapes_config(cfg):
    """
    Add the keys of the embedded shapes dataset (``fpn_plugin.data.shapes``) under
    ``cfg.DATASETS.SHAPES`` (in place), keeping any value ``cfg`` already has; returns ``cfg``.

    Configs that name ``shapes_train``/``shapes_val`` (or the harder split's names) or set
    ``DATASETS.SHAPES.*`` get them from ``fpn_plugin.config.load_config``; ``train_net.py``
    and the demo generate the dataset if missing:
    ``ROOT`` ("datasets/generated/shapes"), ``NUM_TRAIN`` (400), ``NUM_VAL`` (100),
    ``IMAGE_SIZE`` (256), ``SEED`` (0), ``OBJECT_SIZE`` ([0.1, 0.5]), ``MAX_INSTANCES`` (6),
    ``DISTRACTORS`` (0); and ``HARD`` (``ROOT``, ``OBJECT_SIZE``, ``MAX_INSTANCES``,
    ``DISTRACTORS``) for the harder split ``shapes_hard_train``/``shapes_hard_val``; see
    ``fpn_plugin.data.shapes.ensure_shapes_dataset``.
    """
    return add_missing_keys(cfg, [_write_shapes_defaults])


def _write_shapes_defaults(cfg):
    """Every ``DATASETS.SHAPES`` key at its default (on the scratch copy add_missing_keys makes)."""
    node = type(cfg)
    shapes = cfg.DATASETS.SHAPES = node()
    # Folder of the generated images and COCO JSON files (relative to the working directory).
    shapes.ROOT = "datasets/generated/shapes"
    # Images in the training / held-out validation split.
    shapes.NUM_TRAIN = 400
    shapes.NUM_VAL = 100
    # Square image side in pixels.
    shapes.IMAGE_SIZE = 256
    # Generation seed: the dataset is a pure function of these keys.
    shapes.SEED = 0
    # Difficulty: object side range (fractions of IMAGE_SIZE, log-uniform), objects per image
    # (uniform in [1, MAX_INSTANCES]) and unannotated clutter items (uniform in [0, DISTRACTORS]).
    # These defaults are the dataset as it always was, byte for byte.
    shapes.OBJECT_SIZE = list(DEFAULT_OBJECT_SIZE)
    shapes.MAX_INSTANCES = DEFAULT_MAX_INSTANCES
    shapes.DISTRACTORS = 0
    # The harder split (smaller objects, more of them, clutter), registered as
    # "shapes_hard_train"/"shapes_hard_val"; NUM_TRAIN, NUM_VAL, IMAGE_SIZE and SEED are shared.
    shapes.HARD = node()
    shapes.HARD.ROOT = "datasets/generated/shapes_hard"
    shapes.HARD.OBJECT_SIZE = list(SHAPES_HARD["object_size"])
    shapes.HARD.MAX_INSTANCES = SHAPES_HARD["max_instances"]
    shapes.HARD.DISTRACTORS = SHAPES_HARD["distractors"]


def names_shapes_dataset(config: Mapping, opts: Sequence[str] = ()) -> bool:
    """
    Whether a config uses the shapes dataset: its ``DATASETS.TRAIN``/``TEST`` name a
    ``shapes_*`` dataset or it sets ``DATASETS.SHAPES``, in ``config`` (the YAML's content as a
    mapping, ``_BASE_`` files merged) or in the ``KEY VALUE`` overrides ``opts``.
    """
    datasets = config.get("DATASETS") or {}
    if not isinstance(datasets, Mapping):
        return False
    names = [n for key in ("TRAIN", "TEST") for n in _names(datasets.get(key))]
    opts = [str(o) for o in opts]
    for key, value in zip(opts[::2], opts[1::2]):
        if key.startswith("DATASETS.SHAPES"):
            return True
        if key in ("DATASETS.TRAIN", "DATASETS.TEST"):
            names.append(value)
    return "SHAPES" in datasets or any("shapes_" in n for n in names)


def _names(value) -> Sequence[str]:
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []
