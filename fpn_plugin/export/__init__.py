"""Mask export (COCO results JSON with RLE, PNGs, overlays) and safe checkpoint loading."""
