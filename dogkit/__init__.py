"""dogkit: train, export and serve dog-breed classifiers (ResNet50 on Stanford Dogs)."""

__version__ = "0.1.0"

from .limits import set_opencv_cap as _set_opencv_cap

_set_opencv_cap()
