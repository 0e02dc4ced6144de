"""Deployment without PyTorch: an exported ONNX model run by ONNX Runtime on images, folders and benchmarks.

Nothing in this package imports torch (a test runs every module with torch made unimportable).
``preprocess`` is the one preprocessing spec, ``runtime`` loads a model and what it carries, ``predict``
answers for files and folders, ``evaluate`` runs a model over a dataset split, and ``bench`` times the backends.
"""
