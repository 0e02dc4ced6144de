"""The dataset: getting Stanford Dogs (or any class-folder tree), checking every image and writing the manifest.

No PyTorch here.

- ``prepare``: ``dogkit prepare``, the whole job
- ``download``: the official archives, resumable and verified by SHA-256
- ``archives``: safe extraction of .tar/.zip archives
- ``scan``: every candidate image read, hashed and decoded once
- ``images``: one image decoded under the input policy
- ``limits``: the input policy (file, image and archive limits)
- ``annotations``: Stanford Dogs' bounding boxes
- ``split``: the stratified, seeded train/val/test split
- ``dataset``: the manifest as the rest of dogkit reads it
- ``cache``: resized raw copies of every image for fast training
"""
