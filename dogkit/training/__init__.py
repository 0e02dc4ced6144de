"""Training with PyTorch: the three regimes' configs, the ResNet50, the loaders, the loop, and the ONNX export.

``config`` resolves a run's settings, ``models`` builds the network, ``loaders`` and ``transforms`` feed it,
``averaging`` is Averaged Adam's averages, ``distributed`` is the torchrun plumbing, ``device`` picks the
device and precision, ``checkpoint`` saves and loads runs' checkpoints, ``evaluation`` scores a network on a
split, ``trainer`` coordinates one run, and ``export`` writes the best model to ONNX.
"""
