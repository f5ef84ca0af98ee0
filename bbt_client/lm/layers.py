"""The list of transformer blocks inside a Hugging Face model, and running only part of it.

Why: the server runs deep prompts from layer l on (``layers[l:]``) and the GDFO student runs all layers but
the last before its answer-only layer; both find the block list the same way (the ``nn.ModuleList`` with
``num_hidden_layers`` entries: ``encoder.layer``, ``h``, ``layers`` ...) and swap a slice in for one forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass
class LayerList:
    """``getattr(parent, attr) is layers``: where the blocks live, so a slice can stand in for them."""

    parent: Any
    attr: str
    layers: Any

    @classmethod
    def of(cls, model: Any, num_layers: int) -> "LayerList":
        """The ``nn.ModuleList`` of ``num_layers`` blocks in ``model``; ValueError when there is none."""
        from torch import nn

        for qual, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) == num_layers > 0:
                parent, _, attr = qual.rpartition(".")
                return cls(model.get_submodule(parent) if parent else model, attr, mod)
        raise ValueError(f"cannot find a list of {num_layers} transformer layers")

    @contextmanager
    def only(self, start: int = 0, stop: int | None = None) -> Iterator[None]:
        """Run ``layers[start:stop]`` alone inside the block (not thread-safe: one user of the model at a time)."""
        if start == 0 and stop is None:
            yield
            return
        setattr(self.parent, self.attr, type(self.layers)(list(self.layers)[start:stop]))
        try:
            yield
        finally:
            setattr(self.parent, self.attr, self.layers)
