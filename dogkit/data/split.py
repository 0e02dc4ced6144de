"""Stratified, seeded train/val/test assignment that is stable and exact per class.

Each class is split on its own: its counts come from the largest-remainder method, so every
split is within one image of its exact share, and its order comes from an RNG seeded with
(seed, class name), so adding or removing one class never reshuffles another.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import DogkitError

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.70, 0.15, 0.15)


def parse_ratios(text: str) -> tuple[float, float, float]:
    """'70/15/15' (percentages) or '0.7,0.15,0.15' (fractions) → fractions summing to 1.

    Three positive finite shares that add up to 100 or to 1: every split gets images, and a typo
    like 70/15/20 is an error rather than silently rescaled."""
    parts = [p for p in text.replace("/", ",").replace(":", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    problem = None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        problem = "must be three numbers like 70/15/15"
    elif any(v <= 0 for v in values):
        problem = "every share must be above 0 (each split needs images)"
    elif not (abs(sum(values) - 100) < 1e-6 or abs(sum(values) - 1) < 1e-9):
        problem = f"the shares must add up to 100 (or 1), these add up to {sum(values):g}"
    if problem:
        raise DogkitError(f"--ratios: {problem}; got {text!r}")
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Largest-remainder apportionment of n items: each count is floor or ceil of its exact share.

    Ties in the remainders go to the earlier split (train, then val, then test).
    """
    total = sum(ratios)
    exact = [n * r / total for r in ratios]
    counts = [int(np.floor(x + 1e-9)) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def class_rng(seed: int, class_name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))])


def stratified_split(
    items_by_class: Mapping[str, Sequence[str]],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    names: Sequence[str] = SPLITS,
) -> dict[str, str]:
    """Map every item key to a split name. Raises when a class cannot give every split an image."""
    too_small = []
    assignment: dict[str, str] = {}
    for class_name in sorted(items_by_class):
        items = sorted(items_by_class[class_name])
        counts = split_counts(len(items), ratios)
        if any(c == 0 for c, r in zip(counts, ratios) if r > 0):
            too_small.append(f"{class_name} ({len(items)} images → {'/'.join(map(str, counts))})")
            continue
        order = class_rng(seed, class_name).permutation(len(items))
        start = 0
        for name, count in zip(names, counts):
            for idx in order[start : start + count]:
                assignment[items[idx]] = name
            start += count
    if too_small:
        shown = "; ".join(too_small[:10]) + (f"; … {len(too_small) - 10} more" if len(too_small) > 10 else "")
        raise DogkitError(
            f"{len(too_small)} class(es) are too small to put an image in every split "
            f"({'/'.join(names)}): {shown}. With 70/15/15 a class needs at least 5 images. "
            "Add images, remove those class folders, or change --ratios."
        )
    return assignment
