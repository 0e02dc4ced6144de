"""Class folders named by ImageNet synsets (Stanford Dogs' ``n02085620-Chihuahua``), and the columns of an ImageNet
classifier's 1000-class head they correspond to: what the zero-shot baseline reads and what ``head_init=imagenet``
starts a new head from."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..errors import DogkitError
from ..text import shown

SYNSET = re.compile(r"n\d{8}")


def synset(folder: str) -> str | None:
    """The WordNet id a class folder starts with (``n02085620-Chihuahua`` → ``n02085620``), or None."""
    found = SYNSET.match(folder)
    return found.group(0) if found else None


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synsets in the order of the classifiers' outputs (timm's and torchvision's)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_label_name(i) for i in range(info.num_classes())]


def head_columns(folders: Sequence[str]) -> np.ndarray:
    """For each class folder, its column of the ImageNet head; one line when a folder is not an ImageNet synset."""
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    missing = [f for f in folders if synset(f) not in index]
    if missing:
        listed = ", ".join(shown(f) for f in missing[:3]) + (" …" if len(missing) > 3 else "")
        raise DogkitError(f"the ImageNet head needs class folders named by ImageNet synsets (n########-name); "
                          f"{len(missing)} of {len(folders)} are not: {listed}")
    return np.array([index[synset(f)] for f in folders])
