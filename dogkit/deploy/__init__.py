"""Deployment without PyTorch: an exported ONNX model run by ONNX Runtime on images, folders and benchmarks.

Nothing in this package imports torch (a test runs every module with torch made unimportable).

- ``preprocess``: the one preprocessing spec
- ``runtime``: an ONNX model loaded with what it carries (classes, spec, temperature, "unsure" threshold, maps)
- ``explain``: a class's activation map laid on the photo, and overlay pictures
- ``localise``: the maps scored against the dogs' boxes, beside a centred baseline
- ``predict``: ``dogkit predict`` on files, folders and globs
- ``evaluate``: a model's logits (and its maps' localisation) on a dataset split or a class-folder tree
- ``bench``: ``dogkit bench``, every backend timed in its own process
- ``serve``: ``dogkit serve``, the model behind an HTTP API and a page (``static/index.html``), batching
  concurrent requests into one ONNX Runtime call
"""
