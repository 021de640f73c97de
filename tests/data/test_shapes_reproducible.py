"""The shapes dataset is the same, byte for byte, on numpy 1 and numpy 2."""
import hashlib

import numpy as np

from fpn_plugin.data import shapes

# sha256 (first 16 hex digits) of the first 8 training images at 128 px, seed 0, as numpy
# 1.23.5 generated them (before the move to numpy 2). Without float32 factors in the
# background's gradient and stripes, numpy 2's promotion rules (NEP 50) change 7 of them.
NUMPY1_HASHES = ["14acafa672765ae1", "b3d1b1f9f05b662d", "1668ea8f8622279f", "ac2e54293ee81aea",
                 "6642264cc0dd9a90", "a721588226dbf076", "125184ae3b3c0c9c", "ce253b5620e29d70"]


def test_generated_pixels_match_numpy1():
    hashes = []
    for idx in range(len(NUMPY1_HASHES)):
        rng = np.random.default_rng([0, shapes._SPLIT_IDS["train"], idx])
        image, _ = shapes.generate_shapes_image(128, rng)
        hashes.append(hashlib.sha256(image.tobytes()).hexdigest()[:16])
    assert hashes == NUMPY1_HASHES
