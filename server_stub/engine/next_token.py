"""Next-token distributions over the whole vocabulary: the compute behind the OpenAI/vLLM face.

Protocol v1 scores a few label words at a template's ``{mask}``; an OpenAI-style client instead asks "what comes
after this prompt?" and reads log-probabilities over the full vocabulary. The answer slot:

- masked LM: the MLM head at a ``[MASK]`` appended after the prompt. Text: ``[CLS] prompt-tokens [MASK] [SEP]``
  (the tokenizer's own special tokens around the prompt, the mask just before the closing one). Embeddings:
  ``E[CLS] rows E[MASK] E[SEP]`` -- the server adds the special tokens' *word embeddings* around the rows it is
  sent, so rows equal to ``E[ids]`` give exactly the text path's sequence (what the ``vllm`` backend sends).
  Position ids run 0..S-1 over the whole row (CLS at 0), token types are 0, and the rows replace only the word
  embeddings: position/type embeddings and the embedding LayerNorm still apply, as for ids.
- causal LM: the head at the last position. Text: the tokenizer's prefix (BOS if it adds one) + prompt tokens;
  embeddings: the rows exactly as sent (as vLLM does: the client includes BOS itself).

:func:`pick` turns one row of logits into what the face reports (argmax after ``logit_bias`` and
``allowed_token_ids``; top-k log-probs, raw or processed as vLLM's ``--logprobs-mode``; -inf clamped to -9999.0).
Pure compute: no HTTP, no JSON; bad input raises :class:`InvalidInput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from server_stub.engine.loading import LoadedLM
from server_stub.engine.micro_batches import micro_batch_spans
from server_stub.errors import InvalidInput

#: vLLM reports a log-probability of -inf (a token masked out) as this number, since JSON has no -inf.
LOGPROB_FLOOR = -9999.0
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


@dataclass
class NextTokenOutput:
    """``rows[i]`` = ``reduce(logits of sequence i)`` ((V,) float32 on the CPU), plus metering.

    Reducing each micro-batch as it is computed keeps memory at one batch of full-vocabulary logits, not
    prompts × vocabulary (4096 prompts × 30k tokens would be half a gigabyte)."""

    rows: list[Any]
    prompt_tokens: list[int]
    tokens_processed: int = 0
    forward_passes: int = 0


def prompt_ids(lm: LoadedLM, text: str, add_special_tokens: bool = True) -> list[int]:
    """The ids a prompt is billed and tokenized as (what ``/tokenize`` answers): the tokenizer's special tokens
    around the text when ``add_special_tokens``; the answer slot ([MASK]) is not part of it."""
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not add_special_tokens:
        return ids
    return list(lm.special_prefix) + ids + list(lm.special_suffix)


def logits_for_texts(lm: LoadedLM, texts: Sequence[str], max_batch_tokens: int,
                     reduce: Callable[[torch.Tensor], Any] = torch.clone) -> NextTokenOutput:
    """Next-token logits after each text prompt (layout in the module docstring)."""
    seqs, answers, billed = [], [], []
    mask = [lm.tokenizer.mask_token_id] if lm.kind == "masked" else []
    for t in texts:
        body = list(lm.tokenizer(t, add_special_tokens=False)["input_ids"])
        ids = list(lm.special_prefix) + body + mask + list(lm.special_suffix)
        if not ids:
            raise InvalidInput("an empty prompt gives this causal model nothing to continue; send some text")
        answer = len(lm.special_prefix) + len(body) if mask else len(ids) - 1
        seqs.append(ids)
        answers.append(answer)
        billed.append(len(ids) - len(mask))
    _check_lengths(lm, [len(s) for s in seqs])
    with torch.inference_mode():
        embeds = [lm.word_embeddings(torch.tensor(s, device=lm.device)) for s in seqs]
        return _run(lm, embeds, answers, billed, max_batch_tokens, reduce)


def logits_for_embeds(lm: LoadedLM, rows: Sequence[torch.Tensor], max_batch_tokens: int,
                      reduce: Callable[[torch.Tensor], Any] = torch.clone) -> NextTokenOutput:
    """Next-token logits after each (S, D) block of input word embeddings (checked by :func:`check_embeds`)."""
    with torch.inference_mode():
        embeds, answers = [], []
        if lm.kind == "masked":
            pre = lm.word_embeddings(torch.tensor(lm.special_prefix, dtype=torch.long, device=lm.device))
            post = lm.word_embeddings(torch.tensor([lm.tokenizer.mask_token_id, *lm.special_suffix],
                                                   device=lm.device))
        for r in rows:
            r = r.to(lm.device, lm.dtype)
            if lm.kind == "masked":
                embeds.append(torch.cat([pre, r, post]))
                answers.append(len(pre) + len(r))
            else:
                embeds.append(r)
                answers.append(len(r) - 1)
        _check_lengths(lm, [len(e) for e in embeds])
        return _run(lm, embeds, answers, [len(r) for r in rows], max_batch_tokens, reduce)


def check_embeds(lm: LoadedLM, t: object, where: str) -> torch.Tensor:
    """A loaded ``prompt_embeds`` element as a (S, D) tensor, or InvalidInput naming what is wrong with it."""
    if not isinstance(t, torch.Tensor):
        raise InvalidInput(f"{where} holds a {type(t).__name__}, not a tensor: send base64(torch.save(tensor))")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidInput(f"{where} has dtype {str(t.dtype).replace('torch.', '')}; "
                           "send float32, float16 or bfloat16")
    t = t.to_dense() if t.layout != torch.strided else t
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]  # vLLM accepts a leading batch dimension of 1
    if t.dim() != 2:
        raise InvalidInput(f"{where} has shape {tuple(t.shape)}; send (seq_len, hidden_size)")
    if t.shape[1] != lm.hidden_size:
        raise InvalidInput(f"{where} has hidden size {t.shape[1]}; this model has D = {lm.hidden_size}")
    if t.shape[0] == 0:
        raise InvalidInput(f"{where} is empty (seq_len 0)")
    if not torch.isfinite(t).all():
        raise InvalidInput(f"{where} contains NaN or infinite values")
    return t


def _check_lengths(lm: LoadedLM, lengths: Sequence[int]) -> None:
    for i, n in enumerate(lengths):
        if n > lm.max_seq_len:
            extra = " (with the [MASK] and special tokens the server adds)" if lm.kind == "masked" else ""
            raise InvalidInput(f"prompt {i} is {n} tokens{extra}; this model's maximum context length is "
                               f"{lm.max_seq_len}")


def _run(lm: LoadedLM, embeds: list[torch.Tensor], answers: list[int], billed: list[int],
         max_batch_tokens: int, reduce: Callable[[torch.Tensor], Any]) -> NextTokenOutput:
    """Right-padded micro-batches (:func:`micro_batch_spans`, shortest first); full-vocab logits."""
    out = NextTokenOutput([None] * len(embeds), prompt_tokens=billed)
    order = sorted(range(len(embeds)), key=lambda i: len(embeds[i]))
    for start, end in micro_batch_spans([len(embeds[i]) for i in order], max_batch_tokens):
        idx = order[start:end]
        S = max(len(embeds[i]) for i in idx)
        x = torch.zeros(len(idx), S, lm.hidden_size, dtype=lm.dtype, device=lm.device)
        attn = torch.zeros(len(idx), S, dtype=torch.long, device=lm.device)
        for b, i in enumerate(idx):
            x[b, : len(embeds[i])] = embeds[i]
            attn[b, : len(embeds[i])] = 1
        hidden = lm.base_model(inputs_embeds=x, attention_mask=attn, **lm._extra_kwargs())[0]
        h = hidden[torch.arange(len(idx), device=lm.device), torch.tensor([answers[i] for i in idx],
                                                                           device=lm.device)]
        logits = h @ lm.word_embeddings.weight.T if lm.tied_head else lm.head(h)
        for i, row in zip(idx, logits.float().cpu()):
            out.rows[i] = reduce(row)
        out.tokens_processed += sum(len(embeds[i]) for i in idx)
        out.forward_passes += 1
    return out


@dataclass
class Pick:
    """What the face reports for one sequence: the chosen token and the top-k ``(id, logprob)`` pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def pick(logits: torch.Tensor, k: int, *, logit_bias: Mapping[int, float] | None = None,
         allowed_token_ids: Sequence[int] | None = None, mode: str = "processed_logprobs") -> Pick:
    """Greedy next token of one (V,) logit row after ``logit_bias`` and ``allowed_token_ids``, and its top-k.

    ``processed_logprobs`` (OpenAI's behaviour): log-softmax of the biased, restricted logits, so a +100 bias puts
    a token in the top-k and disallowed tokens get -inf. ``raw_logprobs`` (vLLM's default): log-softmax of the
    model's own logits, whatever the bias. -inf is reported as :data:`LOGPROB_FLOOR`, as vLLM does.
    """
    if mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs mode {mode!r}; expected one of {LOGPROBS_MODES}")
    raw = logits.double()
    processed = raw.clone()
    if logit_bias:
        ids = torch.tensor(list(logit_bias.keys()), dtype=torch.long)
        processed[ids] += torch.tensor(list(logit_bias.values()), dtype=torch.float64)
    if allowed_token_ids:
        keep = torch.full_like(processed, float("-inf"))
        ids = torch.tensor(list(allowed_token_ids), dtype=torch.long)
        keep[ids] = processed[ids]
        processed = keep
    chosen = int(torch.argmax(processed))
    lp = torch.log_softmax(processed if mode == "processed_logprobs" else raw, dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(lp, min(k, lp.numel()))
        top = [(int(i), _clamp(float(v))) for i, v in zip(ids, values)]
    return Pick(token_id=chosen, logprob=_clamp(float(lp[chosen])), top=top)


def _clamp(v: float) -> float:
    return max(v, LOGPROB_FLOOR)
