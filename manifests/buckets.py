"""The reference's 13 aspect buckets of about 1 MP (reference-code.md §1.8), as (height, width): the sizes the
1024-px trainer trains at and the Kontext editor edits at. Every side is a multiple of 16 (whole 2×2 tokens of
FLUX's ×8 latent)."""
from __future__ import annotations

import math

BUCKETS_1024 = ((720, 1456), (752, 1392), (784, 1312), (832, 1248), (880, 1184), (944, 1104), (1024, 1024),
                (1104, 944), (1184, 880), (1248, 832), (1312, 784), (1392, 752), (1456, 720))


def nearest_bucket(width: int, height: int) -> tuple[int, int]:
    """(height, width) of the bucket closest in log aspect ratio (so 2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(height / width)
    return min(BUCKETS_1024, key=lambda hw: abs(math.log(hw[0] / hw[1]) - aspect))
