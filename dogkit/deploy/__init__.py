"""Deployment without PyTorch: the exported ONNX model behind an HTTP service."""
