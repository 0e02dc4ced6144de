"""dogkit: train, export and serve dog-breed classifiers (ResNet50 on Stanford Dogs)."""

import os

# albumentations asks the network for a newer version when imported; offline machines would see a warning.
# Set before any dogkit module can import it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

from .data.limits import set_opencv_cap as _set_opencv_cap

_set_opencv_cap()
