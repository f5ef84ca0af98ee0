"""A BERT-style layer computed at one position per sequence: the last layer where only the answer slot is read.

Why: a label-word score needs the final hidden state at one position per sequence (the ``[MASK]``), yet a plain
forward computes every position of the last layer. There only keys and values need all positions; the query,
the attention output projection and the feed-forward block (10 of the layer's 12 D² of weights) are needed at
the answer alone. The server stub (MiniLM-L6: ~14 % of its FLOPs) and GDFO's student (3 layers: ~28 % of each
forward and backward pass) both use it; each checks it against its model's own layer before trusting it.

It rebuilds the layer (``attention.self.{query,key,value}``, ``attention.output``, ``intermediate``, ``output``:
BERT, RoBERTa, MiniLM, e5, ...) from its own modules, quantized ones included, and is differentiable.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: ``fn(h, mask, answer)``: h (B, S, D) input of the last layer, mask (B, S) 1 = token, answer (B,) -> (B, D).
AnswerLayer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def bert_answer_layer(layer: nn.Module) -> AnswerLayer:
    """The answer-only twin of a BERT-style ``layer`` (raises AttributeError if it is not one). Submodules are
    looked up at each call, so it follows them when ``--quantize`` swaps the linear layers."""
    att = layer.attention.self
    _ = (att.query, att.key, att.value, layer.attention.output, layer.intermediate, layer.output)
    head = int(att.attention_head_size)
    scale = float(getattr(att, "scaling", head ** -0.5))

    def forward(h: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        att = layer.attention.self
        B, S, _ = h.shape
        x = h[torch.arange(B, device=h.device), answer.to(h.device)]  # (B, D)
        q = att.query(x).view(B, 1, -1, head).transpose(1, 2)  # (B, H, 1, d)
        k = att.key(h).view(B, S, -1, head).transpose(1, 2)  # (B, H, S, d)
        v = att.value(h).view(B, S, -1, head).transpose(1, 2)
        keep = mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)  # (B, H, 1, d)
        a = layer.attention.output(ctx.transpose(1, 2).reshape(B, -1), x)
        return layer.output(layer.intermediate(a), a)

    return forward


__all__ = ["AnswerLayer", "bert_answer_layer"]
