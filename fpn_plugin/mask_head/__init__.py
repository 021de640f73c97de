"""Mask heads registered in ROI_MASK_HEAD_REGISTRY."""
