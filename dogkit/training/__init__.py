"""Training with PyTorch: the three regimes' configs, the ResNet50, the loaders, the loop, and the ONNX export.

- ``config``: a run's settings, resolved and checked
- ``models``: the network
- ``loaders`` and ``transforms``: the images fed to it
- ``averaging``: Averaged Adam's averages
- ``distributed``: the torchrun plumbing
- ``device``: the device and precision
- ``checkpoint``: runs' checkpoints saved and loaded
- ``evaluation``: a network scored on a split
- ``trainer``: one run, coordinated
- ``events``: what a run tells its subscribers (TensorBoard, integrations)
- ``cam``: which networks have exact class activation maps, and the export wrapper that returns them
- ``export``: the best model to ONNX, behind the parity and accuracy gates, its temperature and "unsure" threshold
  fitted on validation
- ``quantize``: the INT8 and fp16 models derived from the ONNX file
- ``bench``: the PyTorch backends of ``dogkit bench``
"""
