"""The generated-image cache of an inversion: what makes returning to a strength free.

Translations and reconstructions are kept per (condition index, inversion steps used,
guidance) within a byte budget, oldest first out: cachetools' FIFOCache with the arrays'
sizes as their weights.
"""

from __future__ import annotations

import numpy as np
from cachetools import FIFOCache

# Bytes of generated images (translations and reconstructions) an `Inversion` caches for
# scrubbing; the oldest go first. 8 images of a 2048² two-channel field.
CACHE_BUDGET = 256 * 2**20

Key = tuple[int, int, float]  # (condition index, inversion steps used, guidance)


class GenerationCache(FIFOCache):
    """Generated images (model range, cropped) by `Key`; an image larger than the whole budget is not kept."""

    def __init__(self, budget: int = CACHE_BUDGET):
        super().__init__(maxsize=budget, getsizeof=lambda image: image.nbytes)

    def remember(self, key: Key, image: np.ndarray) -> None:
        try:
            self[key] = image
        except ValueError:  # cachetools: "value too large" for the budget
            self.pop(key, None)

    def free_bytes(self) -> int:
        return self.maxsize - self.currsize
