"""Whether the server's model may run its last layer at the answer slot only (:mod:`bbt_client.answer_layer`).

On MiniLM-L6 that skips ~14 % of the model's FLOPs with the same logits up to float noise. :func:`answer_layer_for`
checks the twin against the model's own layer on a padded batch at load time and returns None -- the plain path
-- for any layer it does not reproduce (other attention types, relative positions, causal LMs).
"""

from __future__ import annotations

import logging

import torch

from bbt_client.answer_layer import AnswerLayer, bert_answer_layer

log = logging.getLogger("server_stub.model")


def answer_layer_for(lm, probe_ids: list[int]) -> AnswerLayer | None:
    """An :class:`AnswerLayer` for ``lm``'s last layer if it reproduces the full layer on ``probe_ids`` (two rows,
    one padded), else None."""
    if lm.kind != "masked" or getattr(lm.config, "position_embedding_type", "absolute") != "absolute":
        return None
    try:
        fn = bert_answer_layer(lm.layers[-1])
    except AttributeError:
        return None
    n = max(2, len(probe_ids))
    ids = torch.tensor([probe_ids[:n], probe_ids[: n // 2] + [lm.pad_id] * (n - n // 2)], device=lm.device)
    mask = torch.ones_like(ids)
    mask[1, n // 2:] = 0
    answer = torch.tensor([n - 1, n // 2 - 1], device=lm.device)
    try:
        with torch.inference_mode():
            full = lm.forward_layers(ids, mask, {}, slot_start=0)
            full = full[torch.arange(2, device=full.device), answer]
            h = lm.forward_layers(ids, mask, {}, slot_start=0, capture_at=lm.num_layers - 1)
            fast = fn(h, mask, answer)
    except Exception as exc:  # a layer that only looks like BERT's
        log.info("answer-only last layer unavailable (%s); computing every position", exc)
        return None
    err = float((fast.float() - full.float()).abs().max())
    tol = (1e-4 if lm.dtype == torch.float32 else 5e-2) * max(1.0, float(full.float().abs().max()))
    if not err <= tol:
        log.info("answer-only last layer differs from the model's own by %.2e; computing every position", err)
        return None
    return fn
