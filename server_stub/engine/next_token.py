"""Next-token and prompt-token distributions over the whole vocabulary: the compute behind the OpenAI/vLLM face.

Protocol v1 scores a few label words at a template's ``{mask}``; an OpenAI-style client instead asks "what comes
after this prompt?" (and, with ``echo`` or ``prompt_logprobs``, "how likely was each prompt token?") and reads
log-probabilities over the full vocabulary. The answer slot:

- masked LM: the MLM head at a ``[MASK]`` appended after the prompt. Text: ``[CLS] prompt-tokens [MASK] [SEP]``
  (the tokenizer's own special tokens around the prompt, the mask just before the closing one). Token ids and
  embeddings: ``[CLS] ids [MASK] [SEP]`` / ``E[CLS] rows E[MASK] E[SEP]`` -- the server adds the special tokens
  around what it is sent, so rows equal to ``E[ids]`` give exactly the ids' (and the text's) sequence.
  Position ids run 0..S-1 over the whole row (CLS at 0), token types are 0, and the rows replace only the word
  embeddings: position/type embeddings and the embedding LayerNorm still apply, as for ids.
- causal LM: the head at the last position. Text: the tokenizer's prefix (BOS if it adds one) + prompt tokens;
  token ids and embeddings exactly as sent (as vLLM does: the client includes BOS itself).

A prompt token's log-probability: for a causal LM the ordinary one (the head at the position before it); for a
masked LM its pseudo-log-likelihood term (Salazar et al. 2020): the head at that position with the token
replaced by ``[MASK]``, one extra sequence per scored token. The last prompt token's term is then exactly the
next-token answer of the prompt without it, for both kinds.

:func:`pick` turns one row of logits into what the face reports (argmax after ``logit_bias`` and
``allowed_token_ids``; top-k log-probs, raw or processed as vLLM's ``--logprobs-mode``; -inf clamped to -9999.0).
Pure compute: no HTTP, no JSON; bad input raises :class:`InvalidInput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from server_stub.engine.loading import LoadedLM
from server_stub.engine.micro_batches import PACKED_CPU_BATCH_TOKENS, micro_batch_spans, packed_spans
from server_stub.errors import InvalidInput

#: vLLM reports a log-probability of -inf (a token masked out) as this number, since JSON has no -inf.
LOGPROB_FLOOR = -9999.0
#: vLLM's ``--logprobs-mode`` values the face implements; the first is the default (vLLM's).
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
#: Rows of full-vocabulary logits computed at once (30k-token vocabulary: 256 rows = 31 MB of float32).
_HEAD_ROWS = 256


@dataclass
class Prompt:
    """One prompt as the model sees it.

    ``seq`` (S, D): input word embeddings of the next-token pass, read at ``answer``. ``ids``: the prompt's token
    ids without the answer slot (None for ``prompt_embeds``): the context of prompt-token log-probabilities.
    ``echo``: the ``[start, end)`` slice of ``ids`` that is billed and echoed; ``scored``: indices into ``ids``
    that get a log-probability (not the special tokens the server added, nor a causal prompt's first token)."""

    seq: torch.Tensor
    answer: int
    billed: int
    ids: list[int] | None = None
    echo: tuple[int, int] = (0, 0)
    scored: list[int] = field(default_factory=list)


@dataclass
class ScoredPrompts:
    """``next[i]`` = ``next_reduce(next-token logits of prompt i)``; ``prompt[i]`` = ``prompt_reduce`` of its scored
    tokens' logits (None unless asked), plus metering: every sequence and token run through the model."""

    next: list[Any]
    prompt: list[Any]
    prompt_tokens: list[int]
    sequences: int = 0
    tokens_processed: int = 0
    forward_passes: int = 0


def prompt_ids(lm: LoadedLM, text: str, add_special_tokens: bool = True) -> list[int]:
    """The ids a prompt is billed and tokenized as (what ``/tokenize`` answers): the tokenizer's special tokens
    around the text when ``add_special_tokens``; the answer slot ([MASK]) is not part of it."""
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not add_special_tokens:
        return ids
    return list(lm.special_prefix) + ids + list(lm.special_suffix)


def text_prompt(lm: LoadedLM, text: str) -> Prompt:
    """A text prompt: the tokenizer's special tokens around its tokens (billed and echoed with them)."""
    return _ids_prompt(lm, list(lm.tokenizer(text, add_special_tokens=False)["input_ids"]), from_text=True)


def token_prompt(lm: LoadedLM, ids: Sequence[int]) -> Prompt:
    """A token-id prompt: used as sent by a causal LM; a masked LM gets its special tokens and [MASK] around it."""
    bad = [i for i in ids if not 0 <= i < lm.vocab_size]
    if bad:
        raise InvalidInput(f"token id(s) {bad[:5]} are outside this model's vocabulary (0..{lm.vocab_size - 1})")
    return _ids_prompt(lm, list(ids), from_text=False)


def embeds_prompt(lm: LoadedLM, rows: torch.Tensor) -> Prompt:
    """(S, D) input word embeddings (checked by :func:`check_embeds`); billed as S tokens, as vLLM does."""
    rows = rows.to(lm.device, lm.dtype)
    if lm.kind == "causal":
        return Prompt(seq=rows, answer=len(rows) - 1, billed=len(rows))
    with torch.inference_mode():
        pre = lm.word_embeddings(torch.tensor(lm.special_prefix, dtype=torch.long, device=lm.device))
        post = lm.word_embeddings(torch.tensor([lm.tokenizer.mask_token_id, *lm.special_suffix], device=lm.device))
    return Prompt(seq=torch.cat([pre, rows, post]), answer=len(pre) + len(rows), billed=len(rows))


def _ids_prompt(lm: LoadedLM, body: list[int], from_text: bool) -> Prompt:
    pre, suf = list(lm.special_prefix), list(lm.special_suffix)
    if lm.kind == "masked":
        ids = pre + body + suf
        seq = pre + body + [lm.tokenizer.mask_token_id] + suf
        answer = len(pre) + len(body)
        echo = (0, len(ids)) if from_text else (len(pre), len(pre) + len(body))
        scored = list(range(len(pre), len(pre) + len(body)))
    else:
        ids = (pre if from_text else []) + body
        if not ids:
            raise InvalidInput("an empty prompt gives this causal model nothing to continue; send some text")
        seq, answer, echo, scored = ids, len(ids) - 1, (0, len(ids)), list(range(1, len(ids)))
    with torch.inference_mode():
        emb = lm.word_embeddings(torch.tensor(seq, dtype=torch.long, device=lm.device))
    return Prompt(seq=emb, answer=answer, billed=echo[1] - echo[0], ids=ids, echo=echo, scored=scored)


def score_prompts(lm: LoadedLM, prompts: Sequence[Prompt], max_batch_tokens: int,
                  next_reduce: Callable[[torch.Tensor], Any] = torch.clone,
                  prompt_reduce: Callable[[torch.Tensor, torch.Tensor], Any] | None = None) -> ScoredPrompts:
    """Next-token logits of every prompt, reduced by ``next_reduce((V,))``; with ``prompt_reduce`` also its scored
    tokens' logits, reduced by ``prompt_reduce((P, V) logits, (P,) the tokens actually there)``.

    A causal prompt needs one pass for both; a masked one a pass per scored token (its pseudo-log-likelihood)."""
    _check_lengths(lm, [len(p.seq) for p in prompts])
    out = ScoredPrompts([None] * len(prompts), [None] * len(prompts), [p.billed for p in prompts])
    passes: list[tuple[torch.Tensor, list[int]]] = []
    owner: list[tuple[int, int]] = []  # pass -> (prompt, scored index or -1 for the next-token pass)
    masked_rows: dict[int, list[Any]] = {}
    for i, p in enumerate(prompts):
        want = prompt_reduce is not None and p.ids is not None and bool(p.scored)
        if want and lm.kind == "causal":
            passes.append((p.seq, [j - 1 for j in p.scored] + [p.answer]))
            owner.append((i, -2))
            continue
        passes.append((p.seq, [p.answer]))
        owner.append((i, -1))
        if want:
            with torch.inference_mode():
                ctx = lm.word_embeddings(torch.tensor(p.ids, dtype=torch.long, device=lm.device))
                mask = lm.word_embeddings(torch.tensor(lm.tokenizer.mask_token_id, device=lm.device))
            masked_rows[i] = [None] * len(p.scored)
            for n, j in enumerate(p.scored):
                seq = ctx.clone()
                seq[j] = mask
                passes.append((seq, [j]))
                owner.append((i, n))

    def on_rows(k: int, logits: torch.Tensor) -> None:
        i, n = owner[k]
        p = prompts[i]
        if n == -1:
            out.next[i] = next_reduce(logits[0])
        elif n == -2:
            out.next[i] = next_reduce(logits[-1])
            out.prompt[i] = prompt_reduce(logits[:-1], torch.tensor([p.ids[j] for j in p.scored]))
        else:
            masked_rows[i][n] = prompt_reduce(logits, torch.tensor([p.ids[p.scored[n]]]))[0]

    out.tokens_processed, out.forward_passes = _run(lm, passes, max_batch_tokens, on_rows)
    out.sequences = len(passes)
    for i, rows in masked_rows.items():
        out.prompt[i] = rows
    return out


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


def _run(lm: LoadedLM, passes: Sequence[tuple[torch.Tensor, Sequence[int]]], max_batch_tokens: int,
         on_rows: Callable[[int, torch.Tensor], None]) -> tuple[int, int]:
    """Micro-batches of passes, shortest first; ``on_rows(pass, (P, V) float32 logits at its positions)`` as each
    finishes. A causal model with a packed forward (:mod:`server_stub.engine.packed_causal`) runs up to
    ``max_batch_tokens`` real rows at once (:data:`PACKED_CPU_BATCH_TOKENS` at most on a CPU); otherwise
    right-padded micro-batches (:func:`micro_batch_spans`). Returns (tokens run, forward passes)."""
    tokens = batches = 0
    order = sorted(range(len(passes)), key=lambda i: len(passes[i][0]))
    lengths = [len(passes[i][0]) for i in order]
    packed = getattr(lm, "packed_causal", None)
    if packed is not None:
        cap = PACKED_CPU_BATCH_TOKENS if lm.device.type == "cpu" else max_batch_tokens
        spans = packed_spans(lengths, min(max_batch_tokens, cap))
    else:
        spans = micro_batch_spans(lengths, max_batch_tokens)
    with torch.inference_mode():
        for start, end in spans:
            idx = order[start:end]
            if packed is not None:
                hidden = packed([passes[i][0] for i in idx], [passes[i][1] for i in idx])
            else:
                hidden = _padded_rows(lm, [passes[i] for i in idx])
            _head_rows(lm, hidden, [(i, len(passes[i][1])) for i in idx], on_rows)
            tokens += sum(lengths[start:end])
            batches += 1
    return tokens, batches


def _padded_rows(lm: LoadedLM, passes: Sequence[tuple[torch.Tensor, Sequence[int]]]) -> torch.Tensor:
    """(P, D) last hidden states at each pass's positions, in order, from one right-padded forward pass."""
    S = max(len(seq) for seq, _ in passes)
    x = torch.zeros(len(passes), S, lm.hidden_size, dtype=lm.dtype, device=lm.device)
    attn = torch.zeros(len(passes), S, dtype=torch.long, device=lm.device)
    for b, (seq, _) in enumerate(passes):
        x[b, : len(seq)] = seq
        attn[b, : len(seq)] = 1
    hidden = lm.base_model(inputs_embeds=x, attention_mask=attn, **lm._extra_kwargs())[0]
    rows = torch.tensor([b for b, (_, pos) in enumerate(passes) for _ in pos], device=lm.device)
    cols = torch.tensor([p for _, pos in passes for p in pos], device=lm.device)
    return hidden[rows, cols]


def _head_rows(lm: LoadedLM, hidden: torch.Tensor, items: list[tuple[int, int]],
               on_rows: Callable[[int, torch.Tensor], None]) -> None:
    """The head on (P, D) ``hidden`` (``items``: (pass, its row count), in order), a chunk of whole passes at a
    time (at most :data:`_HEAD_ROWS` rows, or one pass)."""
    counts = [n for _, n in items]
    at = 0
    for start, end in packed_spans(counts, _HEAD_ROWS):
        rows = sum(counts[start:end])
        h = hidden[at : at + rows]
        logits = (h @ lm.word_embeddings.weight.T if lm.tied_head else lm.head(h)).float().cpu()
        done = 0
        for i, n in items[start:end]:
            on_rows(i, logits[done : done + n])
            done += n
        at += rows


@dataclass
class Pick:
    """What the face reports for one sequence: the chosen token and the top-k ``(id, logprob)`` pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def pick(logits: torch.Tensor, k: int, *, logit_bias: Mapping[int, float] | None = None,
         allowed_token_ids: Sequence[int] | None = None, mode: str = "raw_logprobs",
         logprob_token_ids: Sequence[int] | None = None) -> Pick:
    """Greedy next token of one (V,) logit row after ``logit_bias`` and ``allowed_token_ids``, and its top-k
    (or, with vLLM's ``logprob_token_ids``, exactly those tokens' log-probs instead).

    ``raw_logprobs`` (vLLM's default): log-softmax of the model's own logits, whatever the bias.
    ``processed_logprobs`` (OpenAI's behaviour): log-softmax of the biased, restricted logits, so a +100 bias puts
    a token in the top-k and disallowed tokens get -inf. -inf is reported as :data:`LOGPROB_FLOOR`, as vLLM does.
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
    if logprob_token_ids is not None:
        top = [(int(i), _clamp(float(lp[i]))) for i in logprob_token_ids]
    elif k > 0:
        values, ids = torch.topk(lp, min(k, lp.numel()))
        top = [(int(i), _clamp(float(v))) for i, v in zip(ids, values)]
    return Pick(token_id=chosen, logprob=_clamp(float(lp[chosen])), top=top)


@dataclass
class PromptToken:
    """One prompt token's log-probability, its rank (1 = most likely) and the top-k ``(id, logprob)`` there."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


def prompt_tokens(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[PromptToken]:
    """Raw log-softmax at each row of (P, V) ``logits`` for the (P,) ``targets``; vLLM reports prompt
    log-probs unprocessed in every ``--logprobs-mode``."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    got = lp.gather(1, targets[:, None].long())[:, 0]
    ranks = (lp > got[:, None]).sum(dim=1) + 1
    tops: list[list[tuple[int, float]]] = [[] for _ in range(len(lp))]
    if k > 0:
        values, ids = torch.topk(lp, min(k, lp.shape[1]), dim=1)
        tops = [[(int(i), _clamp(float(v))) for i, v in zip(r_ids, r_vals)] for r_ids, r_vals in zip(ids, values)]
    return [PromptToken(int(t), _clamp(float(g)), int(r), top)
            for t, g, r, top in zip(targets, got, ranks, tops)]


def _clamp(v: float) -> float:
    return max(v, LOGPROB_FLOOR)
