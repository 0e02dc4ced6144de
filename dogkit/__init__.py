"""dogkit: train, export and serve dog-breed classifiers (ResNet50 on Stanford Dogs)."""

__version__ = "0.1.0"
