"""Config keys of fpn_plugin.data (dataset-record validation before training)."""
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

    And under ``cfg.DATASETS.SHAPES``, the embedded shapes dataset that configs naming
    ``shapes_train``/``shapes_val`` use (``train_net.py`` and the demo generate it if missing):
    ``ROOT`` ("datasets/generated/shapes"), ``NUM_TRAIN`` (400), ``NUM_VAL`` (100),
    ``IMAGE_SIZE`` (256), ``SEED`` (0), ``OBJECT_SIZE`` ([0.1, 0.5]), ``MAX_INSTANCES`` (6),
    ``DISTRACTORS`` (0); and ``HARD`` (``ROOT``, ``OBJECT_SIZE``, ``MAX_INSTANCES``,
    ``DISTRACTORS``) for the harder split ``shapes_hard_train``/``shapes_hard_val``; see
    ``fpn_plugin.data.shapes.ensure_shapes_dataset``.
    """
    cfg.DATALOADER.INVALID_RECORDS = "skip"
    cfg.DATALOADER.CHECK_IMAGES = True
    cfg.INPUT.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS
    # The embedded shapes dataset (fpn_plugin.data.shapes), used when DATASETS.TRAIN/TEST name
    # "shapes_train"/"shapes_val": train_net.py and the demo generate it if missing.
    cfg.DATASETS.SHAPES = type(cfg)()
    # Folder of the generated images and COCO JSON files (relative to the working directory).
    cfg.DATASETS.SHAPES.ROOT = "datasets/generated/shapes"
    # Images in the training / held-out validation split.
    cfg.DATASETS.SHAPES.NUM_TRAIN = 400
    cfg.DATASETS.SHAPES.NUM_VAL = 100
    # Square image side in pixels.
    cfg.DATASETS.SHAPES.IMAGE_SIZE = 256
    # Generation seed: the dataset is a pure function of these keys.
    cfg.DATASETS.SHAPES.SEED = 0
    # Difficulty: object side range (fractions of IMAGE_SIZE, log-uniform), objects per image
    # (uniform in [1, MAX_INSTANCES]) and unannotated clutter items (uniform in [0, DISTRACTORS]).
    # These defaults are the dataset as it always was, byte for byte.
    cfg.DATASETS.SHAPES.OBJECT_SIZE = list(DEFAULT_OBJECT_SIZE)
    cfg.DATASETS.SHAPES.MAX_INSTANCES = DEFAULT_MAX_INSTANCES
    cfg.DATASETS.SHAPES.DISTRACTORS = 0
    # The harder split (smaller objects, more of them, clutter), registered as
    # "shapes_hard_train"/"shapes_hard_val"; NUM_TRAIN, NUM_VAL, IMAGE_SIZE and SEED are shared.
    cfg.DATASETS.SHAPES.HARD = type(cfg)()
    cfg.DATASETS.SHAPES.HARD.ROOT = "datasets/generated/shapes_hard"
    cfg.DATASETS.SHAPES.HARD.OBJECT_SIZE = list(SHAPES_HARD["object_size"])
    cfg.DATASETS.SHAPES.HARD.MAX_INSTANCES = SHAPES_HARD["max_instances"]
    cfg.DATASETS.SHAPES.HARD.DISTRACTORS = SHAPES_HARD["distractors"]
