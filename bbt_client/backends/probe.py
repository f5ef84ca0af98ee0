"""Find out, with a few requests, what an OpenAI-compatible endpoint can do for label scoring, and pick the way.

Each request that runs the model goes through ``counted`` (inside ``bbt tune`` it is reserved and settled in the
run's budget like any score); ``GET /v1/models`` and ``POST /tokenize`` run no model and are not counted. A request
the endpoint refuses (400) is an answer here, not a failure: it says what is unsupported. The report is a plain
dict (what ``bbt probe`` prints); the chosen strategy is applied to the backend and its facts go in
``report["scoring"]["facts"]``, which a resumed run reapplies without probing again.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from bbt_client.backends.base import Counted
from bbt_client.backends.openai_wire import (
    ChatResponse,
    ModelList,
    first_top_logprobs,
    parse_completions,
    usable_logprob,
    usage_tokens,
)
from bbt_client.errors import EndpointError, ProtocolError, RequestRejected

if TYPE_CHECKING:  # pragma: no cover
    from bbt_client.backends.openai_text import OpenAITextBackend
    from bbt_client.backends.vllm import VLLMBackend

#: Answers that mean "no such route" (a chat-only API has no /v1/completions).
_NO_ROUTE = {404, 405, 501}


class _Prober:
    """The requests of one probe; counts those that run the model."""

    def __init__(self, http, counted: Counted):
        self.http, self.counted, self.calls = http, counted, 0

    async def models(self) -> list[str] | None:
        try:
            listing: ModelList = await self.http.request("GET", "/v1/models", model=ModelList)
        except RequestRejected as exc:
            if exc.status in (400, 404, 405):
                return None
            raise
        return [m.id for m in listing.data]

    async def completions(self, body: dict, retries: int | None = None) -> tuple[Any, bool]:
        """(response, whether the endpoint answered a prompt list with a JSON array)."""
        url = f"{self.http.base_url}/v1/completions"

        async def send():
            data = await self.http.request("POST", "/v1/completions", json_body=body, retries=retries)
            resp = parse_completions(data, url)
            return (resp, isinstance(data, list)), usage_tokens(resp.usage)

        self.calls += 1
        return await self.counted(send)

    async def chat(self, body: dict) -> ChatResponse:
        async def send():
            resp: ChatResponse = await self.http.request("POST", "/v1/chat/completions", json_body=body,
                                                         model=ChatResponse)
            return resp, usage_tokens(resp.usage)

        self.calls += 1
        return await self.counted(send)


def _refusal(exc: Exception) -> str:
    return str(exc).split("(", 1)[-1].rstrip(")") if isinstance(exc, RequestRejected) else str(exc)


def _chat_top(resp: ChatResponse) -> dict[str, float] | None:
    if not resp.choices or not resp.choices[0].logprobs or not resp.choices[0].logprobs.content:
        return None
    first = resp.choices[0].logprobs.content[0]
    return {t.token: t.logprob for t in first.top_logprobs} or {first.token: first.logprob}


async def _capped(ask, first: int = 21) -> tuple[Any, int | None, str | None]:
    """Ask for ``first`` logprobs; a refusal that names the cap is asked again at the cap (then at 5, OpenAI's
    legacy cap). Returns (answer, cap or None when ``first`` was accepted, refusal when nothing was)."""
    from bbt_client.backends.openai_text import logprobs_cap

    try:
        return await ask(first), None, None
    except RequestRejected as exc:
        if exc.status in _NO_ROUTE:
            raise
        cap = logprobs_cap(str(exc))
        for k in [c for c in (cap, 5) if c is not None and 0 < c < first]:
            try:
                return await ask(k), k, None
            except RequestRejected as again:
                exc = again
        return None, cap, _refusal(exc)


async def probe_openai(b: "OpenAITextBackend", counted: Counted, words: list[str]) -> dict:
    """Probe an OpenAI-compatible text endpoint for ``b`` and apply the strategy chosen for ``words``."""
    from bbt_client.backends.openai_text import PROBE_TEXT, PROBE_WORDS, _match_labels

    p = _Prober(b.http, counted)
    r: dict[str, Any] = {"endpoint": b.http.base_url, "backend": "openai", "model": b.model, "api": b.api}
    r["models"] = await p.models()
    r["model_served"] = None if not r["models"] else b.model in r["models"]
    if r["model_served"] is False:
        r["scoring"] = None
        return r
    r["tokenize"] = await _tokenize_shape(b)
    probe_word, probe_id = None, None
    for w in PROBE_WORDS:
        pieces = await b._word_pieces([w])
        if pieces and len(pieces[0]) == 1:
            probe_word, probe_id = w, pieces[0][0]
            break
    r["probe_token"] = None if probe_id is None else {"word": probe_word, "id": probe_id}

    top = None
    if b.api == "completions":
        try:
            ans, cap, refused = await _capped(lambda k: p.completions(
                {"model": b.model, "prompt": PROBE_TEXT, "max_tokens": 1, "temperature": 0, "logprobs": k}))
            r["chat_only"] = False
            if ans is not None:
                resp = ans[0]
                top = first_top_logprobs(resp, 1, "prompts")[0]
                lp = resp.choices[0].logprobs
                r["completions_shape"] = "llama.cpp (logprobs.content)" if lp and lp.content else "openai"
            r["logprobs_cap"] = cap if ans is not None or cap else None
            if ans is not None and cap is None:
                r["logprobs_cap"] = ">=21"
            if refused:
                r["logprobs_refused"] = refused
        except RequestRejected as exc:
            if exc.status not in _NO_ROUTE:
                raise
            r["chat_only"] = True
            b.api = "chat"
    if b.api == "chat":
        r["api"] = "chat"
        ans, cap, refused = await _capped(lambda k: p.chat(
            {"model": b.model, "messages": [{"role": "user", "content": PROBE_TEXT}], "max_tokens": 1,
             "temperature": 0, "logprobs": True, "top_logprobs": k}))
        top = _chat_top(ans) if ans is not None else None
        r["logprobs_cap"] = cap if cap is not None else (">=21" if ans is not None else None)
        if refused:
            r["logprobs_refused"] = refused
    if isinstance(r.get("logprobs_cap"), int):
        b.max_logprobs = max(2, r["logprobs_cap"])
        b.top_logprobs = min(b.top_logprobs, b.max_logprobs)
    r["logprobs"] = top is not None

    r["bias_in_logprobs"] = None
    if top is not None and probe_id is not None:
        r["bias_in_logprobs"] = await _bias_shown(b, p, top, probe_word, probe_id, _match_labels,
                                                  by_id=r["tokenize"].get("field") == "prompt")
    if b.api == "completions" and top is not None:
        r["echo"], r["batching"] = await _echo_and_batching(b, p)
        r["prompt_logprobs"] = await _prompt_logprobs_work(b, p)
        ids = None
        if words:
            pieces = await b._word_pieces(list(words))
            if pieces and all(len(x) == 1 for x in pieces):
                ids = list(dict.fromkeys(x[0] for x in pieces))
        r["logprob_token_ids"] = await _by_ids_work(b, p, ids or ([probe_id] if probe_id is not None else None))
    else:
        r.update(echo=False, prompt_logprobs=False, logprob_token_ids=False)
    await _choose_openai(b, r, words)
    r["calls"] = p.calls
    return r


async def _tokenize_shape(b: "OpenAITextBackend") -> dict:
    """Which field ``POST /tokenize`` reads (``prompt``: vLLM/SGLang, ``content``: llama.cpp), or none."""
    from bbt_client.backends.openai_text import PROBE_WORDS, _NO_TOKENIZE_ROUTE

    text = " " + PROBE_WORDS[0]
    for field in ("prompt", "content"):
        try:
            ids = await b._ask_tokenize(text, field)
        except RequestRejected as exc:
            if exc.status in _NO_TOKENIZE_ROUTE:
                if b.token_counter == "endpoint":
                    b.token_counter = "bytes"
                return {"route": False, "field": None}
            raise
        if ids:
            b.tokenize_field = field
            return {"route": True, "field": field}
    if b.token_counter == "endpoint":
        b.token_counter = "bytes"
    return {"route": True, "field": None, "note": "answers no tokens for either 'prompt' or 'content'"}


async def _bias_shown(b, p: _Prober, top: dict, word: str, tid: int, match, by_id: bool) -> bool | None:
    """Whether a +100 ``logit_bias`` shows in the returned log-probs (processed) or not (raw, as OpenAI and vLLM's
    default). None: the endpoint refused the bias or the biased token did not come back at all. ``by_id``: the
    server takes vLLM's ``return_tokens_as_token_ids``, so the token is found by id, not by its text."""
    bias = {str(tid): 100}
    try:
        if b.api == "completions":
            body = {"model": b.model, "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0,
                    "logprobs": min(5, b.max_logprobs), "logit_bias": bias}
            if by_id:
                body["return_tokens_as_token_ids"] = True
            resp, _ = await p.completions(body)
            biased = first_top_logprobs(resp, 1, "prompts")[0]
        else:
            biased = _chat_top(await p.chat({"model": b.model, "messages": [{"role": "user", "content":
                                             "The capital of France is"}], "max_tokens": 1, "temperature": 0,
                                             "logprobs": True, "top_logprobs": min(5, b.max_logprobs),
                                             "logit_bias": bias}))
    except RequestRejected:
        return None
    if not biased:
        return None
    if f"token_id:{tid}" in biased:
        value, missing = [biased[f"token_id:{tid}"]], [not usable_logprob(biased[f"token_id:{tid}"])]
    else:
        value, missing = match(biased, [word], 0.0)
    if missing[0]:
        return None
    raw, raw_missing = match(top, [word], 0.0)
    return bool(value[0] > -1.0 or (not raw_missing[0] and value[0] > raw[0] + 10))


def _echo_read(c, prompt: str) -> bool:
    """One choice of an echo request holds the prompt's own token log-probs and nothing generated."""
    lp = c.logprobs if c else None
    values = (lp.token_logprobs if lp and lp.token_logprobs is not None else
              [t.logprob for t in lp.content] if lp and lp.content else None)
    if not values or len(values) < 2 or not all(usable_logprob(v) for v in values[1:]):
        return False
    return c.text is None or c.text == prompt


async def _echo_and_batching(b, p: _Prober) -> tuple[bool | None, str]:
    """Whether Completions ``echo`` with ``max_tokens`` 0 returns the prompts' own token log-probs, and how the
    endpoint takes a list of prompts: ``list`` (one choice each), ``array`` (llama.cpp: a JSON array of responses)
    or ``one per request`` (llama-cpp-python answers a list with a 500; the backend then sends one prompt each).
    One echo request of three prompts answers both; asked once, without retries, since a server error here is an
    answer. Where lists fail, echo is not tried alone: llama-cpp-python reads ``max_tokens`` 0 as "until the context
    is full", which a probe must not pay for."""
    from bbt_client.backends.openai_text import PROBE_BATCH

    prompts = list(PROBE_BATCH)
    try:
        resp, array = await p.completions(b.echo_body(prompts, "echo"), retries=0)
        if len(resp.choices) == len(prompts):
            choices = sorted(resp.choices, key=lambda c: c.index)
            return all(_echo_read(c, t) for c, t in zip(choices, prompts)), "array" if array else "list"
    except (RequestRejected, ProtocolError):
        pass  # echo refused, or lists refused: the plain list below tells which
    except EndpointError as exc:
        if exc.status != 500:
            raise
    try:
        resp, array = await p.completions({"model": b.model, "prompt": prompts, "max_tokens": 1, "temperature": 0,
                                           "logprobs": 1}, retries=0)
        if len(resp.choices) == len(prompts):
            return False, "array" if array else "list"
    except (RequestRejected, ProtocolError):
        pass
    except EndpointError as exc:
        if exc.status != 500:
            raise
    b.prompts_per_request = 1
    return None, "one per request"


async def _prompt_logprobs_work(b, p: _Prober) -> bool:
    from bbt_client.backends.openai_text import PROBE_TEXT

    try:
        resp, _ = await p.completions({"model": b.model, "prompt": PROBE_TEXT, "max_tokens": 1, "temperature": 0,
                                       "prompt_logprobs": 0})
    except (RequestRejected, ProtocolError):
        return False
    c = resp.choices[0] if resp.choices else None
    return bool(c and c.prompt_logprobs and len(c.prompt_logprobs) >= 2)


async def _by_ids_work(b, p: _Prober, ids: list[int] | None) -> bool | None:
    """vLLM's ``logprob_token_ids`` returns every asked id: the label words' when they are single tokens
    (None: no token id to ask for)."""
    from bbt_client.backends.openai_text import PROBE_TEXT

    if not ids:
        return None
    try:
        resp, _ = await p.completions(b.by_ids_body([PROBE_TEXT], ids) | {"prompt": PROBE_TEXT})
    except (RequestRejected, ProtocolError):
        return False
    top = first_top_logprobs(resp, 1, "prompts")[0] or {}
    return all(usable_logprob(top.get(f"token_id:{i}")) for i in ids)


async def _choose_openai(b: "OpenAITextBackend", r: dict, words: Sequence[str]) -> None:
    """The exact strategy when there is one (``logprob_token_ids``: 1 sequence per text; then ``echo`` and
    ``prompt_logprobs``: K), else ``bias`` where the bias shows in logprobs, else ``top-k``."""
    if b.bias_in_logprobs is None:
        b.bias_in_logprobs = r.get("bias_in_logprobs")
    pieces = None
    if words:
        pieces = await b._word_pieces(list(words))
    elif r.get("probe_token"):
        pieces = [[r["probe_token"]["id"]]]
    known = pieces is not None
    single = known and all(len(x) == 1 for x in pieces)
    told = b.scoring_option != "auto"
    if told:
        strategy = b.scoring_option
    elif b.api == "completions" and r.get("logprob_token_ids") and single:
        strategy = "logprob_token_ids"
    elif b.api == "completions" and r.get("echo") and known:
        strategy = "echo"
    elif b.api == "completions" and r.get("prompt_logprobs") and known:
        strategy = "prompt_logprobs"
    elif b.bias_in_logprobs and single:
        strategy = "bias"
    else:
        strategy = "top-k"
    b.strategy = strategy
    if strategy == "top-k":
        b.top_logprobs = b.max_logprobs  # as many as the endpoint returns: every extra one may hold a label
    r["scoring"] = b.scoring(len(words) or 2).as_dict()
    r["scoring"]["told"] = told


# ---------------------------------------------------------------------- vLLM prompt embeddings


async def probe_vllm(b: "VLLMBackend", counted: Counted, words: list[str]) -> dict:
    """Probe a vLLM server for the ``vllm`` (prompt_embeds) backend and apply the strategy chosen for ``words``:
    prompt embeddings accepted at all, the logprobs cap (asked with a text prompt: the cap is the server's, the
    same for both), ``logprob_token_ids`` on embeddings, and whether ``allowed_token_ids`` shows in logprobs."""
    from bbt_client.backends.causal_template import label_text
    from bbt_client.backends.openai_text import PROBE_TEXT, PROBE_WORDS
    from bbt_client.backends.vllm import encode_prompt_embeds

    p = _Prober(b.http, counted)
    r: dict[str, Any] = {"endpoint": b.http.base_url, "backend": "vllm"}
    r["models"] = await p.models()
    r["model"] = await b.served_model()
    tk = b.emb.tokenizer
    ids = ([tk.bos_id] if b.add_bos else []) + tk.encode(PROBE_TEXT)
    seq = encode_prompt_embeds(b.emb.embed(ids), b.embeds_dtype)
    named = {"model": b.model} if b.model is not None else {}
    base = named | {"prompt_embeds": [seq], "max_tokens": 1, "temperature": 0.0, "return_tokens_as_token_ids": True}
    try:
        resp, _ = await p.completions(base | {"logprobs": 5})
        first_top_logprobs(resp, 1, "prompt embeddings")
        r["prompt_embeds"] = True
    except RequestRejected as exc:
        r.update(prompt_embeds=False, prompt_embeds_refused=_refusal(exc), scoring=None, calls=p.calls)
        return r
    ans, cap, refused = await _capped(lambda k: p.completions(named | {"prompt": PROBE_TEXT, "max_tokens": 1,
                                                                        "temperature": 0, "logprobs": k}))
    r["logprobs_cap"] = cap if cap is not None else ">=21" if ans is not None else None
    if refused:
        r["logprobs_refused"] = refused
    if cap is not None:
        b.max_logprobs = cap
        b.top_logprobs = min(b.top_logprobs, cap)
    label_ids = []
    for w in (list(words) or list(PROBE_WORDS[:2])):
        t = tk.encode(label_text(w))
        if len(t) == 1:
            label_ids.append(t[0])
    label_ids = list(dict.fromkeys(label_ids)) or [ids[-1]]
    try:
        resp, _ = await p.completions(base | {"logprobs": 1, "logprob_token_ids": label_ids})
        top = first_top_logprobs(resp, 1, "prompt embeddings")[0] or {}
        r["logprob_token_ids"] = all(usable_logprob(top.get(f"token_id:{i}")) for i in label_ids)
    except RequestRejected as exc:
        r.update(logprob_token_ids=False, logprob_token_ids_refused=_refusal(exc))
    r["restricted_in_logprobs"] = None
    if 2 <= len(label_ids) <= b.max_logprobs:
        try:
            resp, _ = await p.completions(base | {"logprobs": len(label_ids), "allowed_token_ids": label_ids})
            top = first_top_logprobs(resp, 1, "prompt embeddings")[0] or {}
            vals = [top.get(f"token_id:{i}") for i in label_ids]
            r["restricted_in_logprobs"] = (all(usable_logprob(v) for v in vals)
                                           and abs(sum(math.exp(v) for v in vals) - 1.0) < 1e-3)
        except RequestRejected:
            pass
    if b.processed_logprobs is None:
        b.processed_logprobs = r["restricted_in_logprobs"]
    told = b.scoring_option != "auto"
    if told:
        strategy = b.scoring_option
    elif r.get("logprob_token_ids"):
        strategy = "logprob_token_ids"
    elif b.processed_logprobs:
        strategy = "allowed_token_ids"
    else:
        strategy = "top-k"
    b.strategy = strategy
    if strategy == "top-k":
        b.top_logprobs = b.max_logprobs
    r["scoring"] = b.scoring(len(words) or 2).as_dict()
    r["scoring"]["told"] = told
    r["calls"] = p.calls
    return r
