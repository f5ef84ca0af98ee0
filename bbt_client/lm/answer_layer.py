"""A BERT-style layer computed at one position per sequence: the last layer where only the answer slot is read.

Why: a label-word score needs the final hidden state at one position per sequence (the ``[MASK]``), yet a plain
forward computes every position of the last layer. There only keys and values need all positions; the query,
the attention output projection and the feed-forward block (10 of the layer's 12 D² of weights) are needed at
the answer alone. The server stub (MiniLM-L6: ~14 % of its FLOPs) and GDFO's student (3 layers: ~28 % of each
forward and backward pass) both use it; each checks it against its model's own layer before trusting it.

It rebuilds the layer (``attention.self.{query,key,value}``, ``attention.output``, ``intermediate``, ``output``:
BERT, RoBERTa, MiniLM, e5, ...) from its own modules, quantized ones included, and is differentiable.
:func:`checked_answer_layer` is the one check both callers trust it by.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: ``fn(h, mask, answer)``: h (B, S, D) input of the last layer, mask (B, S) 1 = token, answer (B,) -> (B, D).
AnswerLayer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

log = logging.getLogger(__name__)


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


def checked_answer_layer(layer: nn.Module, config, states: Callable[[AnswerLayer | None], torch.Tensor],
                         tol: float = 1e-4) -> AnswerLayer | None:
    """The answer-only twin of the model's last ``layer`` if it reproduces it, else None (compute every position).

    ``states(twin)``: the answer slots' final states on a padded probe batch, computed with ``twin`` (or with the
    model's own last layer for None). Refused: relative position embeddings, a layer that is not BERT-style, one
    that only looks like it (an error), or a difference past ``tol`` times the states' largest entry (at least 1).
    """
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    try:
        twin = bert_answer_layer(layer)
    except AttributeError:
        return None
    try:
        full, fast = states(None), states(twin)
    except Exception as exc:  # a layer that only looks like BERT's
        log.info("answer-only last layer unavailable (%s); computing every position", exc)
        return None
    err = float((fast.float() - full.float()).abs().max())
    if not err <= tol * max(1.0, float(full.float().abs().max())):
        log.info("answer-only last layer differs from the model's own by %.2e; computing every position", err)
        return None
    return twin


__all__ = ["AnswerLayer", "bert_answer_layer", "checked_answer_layer"]
