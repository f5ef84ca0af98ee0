"""What the server reports in ``ModelInfo.weight_digests``: one digest per parameter tensor it serves.

Why: a client that distils this endpoint (GDFO) must not hold its weights; listing digests lets it check
without the weights ever leaving the server. The digest itself is :func:`bbt_client.lm.weight_digests.weight_digest`
(first 16 hex of sha256 over float32 bytes; constant tensors skipped), shared with the client.
"""

from __future__ import annotations

from typing import Any

from bbt_client.lm.weight_digests import weight_digests as _digests_of_arrays


def weight_digests(module: Any) -> list[str]:
    """Digests of every distinct parameter of a torch module, in ``named_parameters`` order.

    Tied parameters count once (``named_parameters`` yields each tensor once); buffers (position ids and
    the like) are not weights and are left out. Computed once at start-up: ~0.1 s for MiniLM-L6 on CPU.
    """
    return _digests_of_arrays(p.detach().float().cpu().numpy() for _, p in module.named_parameters())


__all__ = ["weight_digests"]
