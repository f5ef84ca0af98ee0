"""A Llama-family decoder run over many sequences packed into one (T, D) row block: no padding, no 4-D mask.

The padded path (``base_model(inputs_embeds, attention_mask)``) runs every projection, norm and rotary product on
B × S_max positions and builds a (B, 1, S, S) mask; BBT-shaped requests (tens of sequences of 20-35 rows) waste a
sixth of that on padding. Packed, the per-token work runs on the T real rows only, and attention runs per group of
equal-length sequences with ``is_causal`` (each sequence attends to itself only). On the last layer only the
positions a caller reads need their query, output projection and MLP.

:func:`packed_causal_for` returns the runner only for the decoder layout it implements (Llama's modules,
no sliding window) and only after it reproduced the model's own forward on a padded probe batch at load time;
anything else keeps the padded path.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_MODEL_TYPES = ("llama",)
_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp",
                "input_layernorm", "post_attention_layernorm")


class PackedCausal:
    """Final-norm hidden states of a causal decoder at chosen positions of unpadded sequences."""

    def __init__(self, base_model: torch.nn.Module, layers: Sequence[torch.nn.Module]):
        self.base_model, self.layers = base_model, list(layers)
        cfg = base_model.config
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)

    def __call__(self, seqs: Sequence[torch.Tensor], positions: Sequence[Sequence[int]]) -> torch.Tensor:
        """(P, D) final hidden states (after the model's last norm) at ``positions[i]`` of ``seqs[i]`` (L_i, D),
        in order: all of sequence 0's positions, then sequence 1's ... Sequences sorted by length run fastest
        (each run of equal lengths is one attention call)."""
        dev = seqs[0].device
        lens = [len(s) for s in seqs]
        x = torch.cat(list(seqs))
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])
        cos, sin = self.base_model.rotary_emb(x[None], pos[None])
        rope = (cos[0][:, None], sin[0][:, None])  # (T, 1, hd): broadcast over heads
        runs: list[tuple[int, int, int]] = []  # (first row, sequences, length) of each run of equal lengths
        row = 0
        for n in lens:
            if runs and runs[-1][2] == n:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1, n)
            else:
                runs.append((row, 1, n))
            row += n
        starts = [0]
        for n in lens[:-1]:
            starts.append(starts[-1] + n)
        last_only = all(len(ps) == 1 and ps[0] == n - 1 for ps, n in zip(positions, lens))
        for layer in self.layers[:-1] if last_only else self.layers:
            x = self._layer(layer, x, rope, runs)
        if last_only:
            x = self._last_layer_at_ends(self.layers[-1], x, rope, runs)  # (n_seqs, D): the positions wanted
        else:
            x = x.index_select(0, torch.tensor([starts[i] + p for i, ps in enumerate(positions) for p in ps],
                                               device=dev))
        return self.base_model.norm(x)

    def _qkv(self, layer, x: torch.Tensor, rope, q_rows: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (at ``q_rows`` only, if given), rotated keys and values of every row."""
        attn, T = layer.self_attn, x.shape[0]
        h = layer.input_layernorm(x)
        k = attn.k_proj(h).view(T, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(T, self.kv_heads, self.head_dim)
        cos, sin = rope
        if q_rows is not None:
            h, cos, sin = h.index_select(0, q_rows), cos.index_select(0, q_rows), sin.index_select(0, q_rows)
        q = attn.q_proj(h).view(h.shape[0], self.heads, self.head_dim)
        return _rotate(q, cos, sin), _rotate(k, *rope), v

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """(n, Lq, H, hd) queries over (n, L, KV, hd) keys/values -> (n, Lq, H, hd)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=self.scaling,
                                             enable_gqa=self.kv_heads != self.heads)
        return out.transpose(1, 2)

    def _layer(self, layer, x: torch.Tensor, rope, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        q, k, v = self._qkv(layer, x, rope)
        ctx = torch.empty_like(q)
        for row, n, L in runs:
            rows = slice(row, row + n * L)
            ctx[rows].view(n, L, self.heads, self.head_dim).copy_(self._sdpa(
                *(t[rows].view(n, L, t.shape[1], self.head_dim) for t in (q, k, v)), causal=True))
        x = x + layer.self_attn.o_proj(ctx.view(x.shape[0], -1))
        return x.add_(layer.mlp(layer.post_attention_layernorm(x)))

    def _last_layer_at_ends(self, layer, x: torch.Tensor, rope, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        """The layer's output at each sequence's last position only, (n_seqs, D) in sequence order: the last
        query attends to its whole sequence, so no mask is needed."""
        ends = torch.cat([torch.arange(row + L - 1, row + n * L, L, device=x.device) for row, n, L in runs])
        q, k, v = self._qkv(layer, x, rope, q_rows=ends)
        ctx, first = [], 0
        for row, n, L in runs:
            rows = slice(row, row + n * L)
            kr, vr = (t[rows].view(n, L, t.shape[1], self.head_dim) for t in (k, v))
            ctx.append(self._sdpa(q[first:first + n, None], kr, vr, causal=False).reshape(n, -1))
            first += n
        h = x.index_select(0, ends) + layer.self_attn.o_proj(torch.cat(ctx))
        return h.add_(layer.mlp(layer.post_attention_layernorm(h)))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, as Llama's ``apply_rotary_pos_emb``: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def packed_causal_for(lm, tol: float | None = None) -> PackedCausal | None:
    """A :class:`PackedCausal` for ``lm`` (a :class:`~server_stub.engine.loading.LoadedLM`) if its decoder has the
    layout it implements and it reproduces ``lm.base_model`` on a padded probe batch within ``tol``, else None."""
    cfg = lm.config
    if lm.kind != "causal" or getattr(cfg, "model_type", None) not in _MODEL_TYPES:
        return None
    if getattr(cfg, "sliding_window", None) or not all(hasattr(lm.base_model, a) for a in ("norm", "rotary_emb")):
        return None
    if not all(_has(lm.layers[0], p) for p in _LAYER_PARTS):
        return None
    tol = tol if tol is not None else (1e-4 if lm.dtype == torch.float32 else 5e-2)
    try:
        packed = PackedCausal(lm.base_model, lm.layers)
        worst = _probe_error(lm, packed)
    except Exception as e:  # noqa: BLE001 - any surprise in a foreign model: keep the padded path
        log.info("packed causal forward unavailable for %s: %s", lm.architecture, e)
        return None
    if worst > tol:
        log.info("packed causal forward differs from %s by %.3g (> %.3g): padded path", lm.architecture, worst, tol)
        return None
    return packed


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _probe_error(lm, packed: PackedCausal) -> float:
    """Largest |difference| of the final hidden states, packed vs the model's padded forward, on three probe
    sequences of different lengths: every position, and the last positions alone."""
    g = torch.Generator().manual_seed(0)
    lens = [7, 12, 12]
    seqs = [lm.word_embeddings(torch.randint(0, lm.vocab_size, (n,), generator=g).to(lm.device)) for n in lens]
    S = max(lens)
    x = torch.zeros(len(lens), S, lm.hidden_size, dtype=lm.dtype, device=lm.device)
    mask = torch.zeros(len(lens), S, dtype=torch.long, device=lm.device)
    for b, s in enumerate(seqs):
        x[b, : len(s)] = s
        mask[b, : len(s)] = 1
    with torch.inference_mode():
        ref = lm.base_model(inputs_embeds=x, attention_mask=mask, **lm._extra_kwargs())[0]
        want_all = torch.cat([ref[b, : n] for b, n in enumerate(lens)])
        want_last = torch.stack([ref[b, n - 1] for b, n in enumerate(lens)])
        got_all = packed(seqs, [list(range(n)) for n in lens])
        got_last = packed(seqs, [[n - 1] for n in lens])
    return max(float((got_all - want_all).abs().max()), float((got_last - want_last).abs().max()))
