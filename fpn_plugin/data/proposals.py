"""
Precomputed proposals (``DATASETS.PROPOSAL_FILES_*``) read without running code.

Detectron2's ``load_proposals_into_dataset`` reads these pickle files with ``pickle.load``,
which runs whatever a crafted file asks for. Here the same files (a dict with "ids", "boxes",
"objectness_logits" and optionally "bbox_mode"; Detectron1's "indexes"/"scores" names too) are
read with an unpickler that rebuilds only containers, numpy arrays and ``BoxMode``, and a
record without proposals is an error naming the image id and the file.
"""
import logging
from typing import Dict, List

import numpy as np
from detectron2.structures import BoxMode

from ..utils.safe_pickle import RefusedGlobalError, load_pickle_of_arrays

__all__ = ["load_proposal_file", "load_proposals_into_records"]

logger = logging.getLogger(__name__)

_D1_NAMES = {"indexes": "ids", "scores": "objectness_logits"}


def load_proposal_file(path: str) -> Dict:
    """
    Read a proposal file safely.

    Returns:
        dict with "ids", "boxes", "objectness_logits" and possibly "bbox_mode".

    Raises:
        ValueError: missing, corrupt, refused (it names another global) or incomplete file.
    """
    from detectron2.utils.file_io import PathManager

    try:
        with PathManager.open(path, "rb") as f:
            data = load_pickle_of_arrays(f, {
                (BoxMode.__module__, "BoxMode"): BoxMode})
    except RefusedGlobalError as e:
        raise ValueError(f"proposal file {path!r} was not loaded: {e} (loading it would run "
                         "code from the file)") from e
    except Exception as e:  # missing, truncated, not a pickle
        raise ValueError(f"proposal file {path!r} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"proposal file {path!r} holds a {type(data).__name__}, not a dict")
    for old, new in _D1_NAMES.items():
        if old in data:
            data[new] = data.pop(old)
    missing = [k for k in ("ids", "boxes", "objectness_logits") if k not in data]
    if missing:
        raise ValueError(f"proposal file {path!r} lacks {missing}")
    return data


def load_proposals_into_records(records: List[Dict], path: str) -> List[Dict]:
    """
    Add "proposal_boxes", "proposal_objectness_logits" (sorted by decreasing score) and
    "proposal_bbox_mode" to each record, from the proposal file ``path`` (as Detectron2's
    ``load_proposals_into_dataset`` does, with the file read safely).
    """
    logger.info(f"Loading proposals from: {path}")
    data = load_proposal_file(path)
    index = {str(image_id): i for i, image_id in enumerate(data["ids"])}
    mode = BoxMode(data["bbox_mode"]) if "bbox_mode" in data else BoxMode.XYXY_ABS
    for record in records:
        i = index.get(str(record["image_id"]))
        if i is None:
            raise ValueError(f"proposal file {path!r} has no proposals for image_id "
                             f"{record['image_id']!r} ({record.get('file_name')})")
        boxes = np.asarray(data["boxes"][i])
        logits = np.asarray(data["objectness_logits"][i])
        order = np.argsort(-logits, kind="stable")
        record["proposal_boxes"] = boxes[order]
        record["proposal_objectness_logits"] = logits[order]
        record["proposal_bbox_mode"] = mode
    return records
