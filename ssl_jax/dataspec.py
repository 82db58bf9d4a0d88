"""What a method and the setup layer know about the data, read from the prepared dataset.

The facts a config used to hard-code (the train split's size for a memory bank,
the number of classes for a supervised head) come from here instead, so a
config works on any dataset without edits.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """num_examples: rows of the train split (a memory bank has one per image);
    image_shape: (H, W, C) of the images a batch holds: the stored images', or,
    for a dataset whose images vary in size (varying_size), the (S, S, C) canvas
    they are decoded onto (batches then carry "image_hw", views/canvas.py);
    num_classes: None for a dataset without labels; class_names: one per class."""
    num_examples: int
    image_shape: tuple
    num_classes: int | None = None
    class_names: tuple[str, ...] = ()
    varying_size: bool = False
