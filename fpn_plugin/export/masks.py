"""Pure array helpers for exported masks (no Detectron2, no file I/O)."""
import numpy as np

__all__ = ["instance_id_map", "score_order"]


def score_order(scores: np.ndarray) -> np.ndarray:
    """
    Indices that sort ``scores`` from highest to lowest; ties keep their input order.

    Args:
        scores (np.ndarray): (N,) float.

    Returns:
        np.ndarray: (N,) int64 permutation.
    """
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def instance_id_map(masks: np.ndarray) -> np.ndarray:
    """
    Paint instance masks into one id image: 0 is background, pixel value ``k`` is instance
    ``k - 1`` of ``masks``. Where masks overlap, the *earlier* instance wins, so pass them
    ordered by decreasing score to keep the most confident instance on top.

    Args:
        masks (np.ndarray): (N, H, W) bool (or 0/1) masks, N <= 65535.

    Returns:
        np.ndarray: (H, W) uint16 (16 bits: more than 255 instances fit; PNG stores it losslessly).
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    n, h, w = masks.shape
    if n > np.iinfo(np.uint16).max:
        raise ValueError(f"{n} instances do not fit a 16-bit id image")
    ids = np.zeros((h, w), dtype=np.uint16)
    # Paint from last to first so the first (highest-score) instance ends on top.
    for k in range(n - 1, -1, -1):
        ids[masks[k].astype(bool)] = k + 1
    return ids
