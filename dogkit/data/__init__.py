"""The dataset: getting Stanford Dogs (or any class-folder tree), checking every image and writing the manifest.

No PyTorch here. ``prepare`` runs the job; ``download`` and ``archives`` fetch and unpack the official files,
``scan`` decodes every image once, ``images`` and ``limits`` decode one image under the input policy,
``annotations`` reads the bounding boxes, ``split`` makes the stratified 70/15/15 split, ``dataset`` reads and
writes the manifest, and ``cache`` keeps resized copies for fast training.
"""
