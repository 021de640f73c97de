"""
Mask export: COCO results JSON (RLE), instance-id PNGs and overlays from a Detectron2 model,
written streaming and atomically. Command line: ``python -m fpn_plugin.export --help``.
"""
from .coco_results import contiguous_to_dataset_ids, instances_to_coco_results
from ..utils.paths import IMAGE_EXTENSIONS, list_folder_images
from .export import RESULTS_FILE, export_masks
from .masks import instance_id_map, score_order
from .progress import ProgressLogger
from .writers import StreamingJSONArrayWriter, atomic_write_bytes, atomic_write_json

__all__ = [
    "IMAGE_EXTENSIONS",
    "RESULTS_FILE",
    "ProgressLogger",
    "StreamingJSONArrayWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "contiguous_to_dataset_ids",
    "export_masks",
    "instance_id_map",
    "instances_to_coco_results",
    "list_folder_images",
    "score_order",
]
