"""Reading a file saved with ``torch.save`` safely: tensors and plain containers only, or one line saying why not."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import DogkitError
from ..text import not_a_file, shown


def safe_load(path: Path, map_location, what: str):
    """``torch.load(weights_only=True)``, or one line naming the file and why it is not ``what`` dogkit can load
    safely; never torch's advice to load it with ``weights_only=False``, which runs any code the file holds."""
    if problem := not_a_file(path):  # a FIFO would block torch.load for ever, a device feed it without end
        raise DogkitError(f"cannot load {shown(path)}: {problem}")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": a second line for a file refused anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and format errors: all mean "not a file to load"
        raise DogkitError(f"cannot load {shown(path)}: not {what} dogkit can load safely "
                          f"({load_problem(Path(path), e)})") from e


def load_problem(path: Path, e: Exception) -> str:
    """Why torch.load refused a file, in a few words."""
    try:
        with open(path, "rb") as f:
            start = f.read(2)
    except OSError as oe:
        return oe.strerror or type(oe).__name__
    if not start:
        return "the file is empty"
    if not start.startswith((b"PK", b"\x80")):  # torch.save writes a zip; older torch a pickle
        return "it was not saved by PyTorch"
    if isinstance(e, EOFError) or "central directory" in str(e):
        return "the file is cut short"
    text = str(e).split("WeightsUnpickler error:", 1)  # what torch found; the rest of its message is advice
    lines = [line.strip() for line in text[-1].split("\n") if line.strip()] or [type(e).__name__]
    if len(text) == 1:
        return lines[0].split(". ")[0]
    return "it holds more than tensors and plain containers: " + lines[0].split(". Please use")[0].rstrip(".")
