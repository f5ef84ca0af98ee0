"""Whether the server's model may run its last layer at the answer slot only (:mod:`bbt_client.lm.answer_layer`).

On MiniLM-L6 that skips ~14 % of the model's FLOPs with the same logits up to float noise. :func:`answer_layer_for`
checks the twin against the model's own layer on a padded batch at load time and returns None -- the plain path
-- for any layer it does not reproduce (other attention types, relative positions, causal LMs).
"""

from __future__ import annotations

import torch

from bbt_client.lm.answer_layer import AnswerLayer, checked_answer_layer


def answer_layer_for(lm, probe_ids: list[int]) -> AnswerLayer | None:
    """An :class:`AnswerLayer` for ``lm``'s last layer if it reproduces the full layer on ``probe_ids`` (two rows,
    one padded), else None."""
    if lm.kind != "masked":
        return None
    n = max(2, len(probe_ids))
    ids = torch.tensor([probe_ids[:n], probe_ids[: n // 2] + [lm.pad_id] * (n - n // 2)], device=lm.device)
    mask = torch.ones_like(ids)
    mask[1, n // 2:] = 0
    answer = torch.tensor([n - 1, n // 2 - 1], device=lm.device)

    def states(twin: AnswerLayer | None) -> torch.Tensor:
        with torch.inference_mode():
            if twin is None:
                full = lm.forward_layers(ids, mask, {}, slot_start=0)
                return full[torch.arange(2, device=full.device), answer]
            return twin(lm.forward_layers(ids, mask, {}, slot_start=0, capture_at=lm.num_layers - 1), mask, answer)

    return checked_answer_layer(lm.layers[-1], lm.config, states, tol=1e-4 if lm.dtype == torch.float32 else 5e-2)
