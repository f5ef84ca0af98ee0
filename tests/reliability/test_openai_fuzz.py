"""Hostile bodies on the OpenAI/vLLM face (``/v1/completions``, ``/v1/chat/completions``): every malformed one is
a 4xx in OpenAI's error shape, never a 5xx, and the server process stays up and keeps answering.

One server process per model kind (masked and causal: their prompt-token paths differ), with prompt embeddings
and a chat template enabled so every branch of the face is reachable.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.helpers import ServerProcess

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module", params=["tiny_bert_dir", "tiny_llama_dir"])
def face_server(request, tmp_path_factory):
    model = request.getfixturevalue(request.param)
    log = tmp_path_factory.mktemp("openai-fuzz") / "server.log"
    sp = ServerProcess(model, log_path=log, options={
        "max_body_bytes": 1 << 20, "max_texts": 16, "max_logprobs": 5, "enable_prompt_embeds": True,
        "chat_template": TEMPLATE})
    sp.start()
    with httpx.Client(base_url=sp.url, timeout=30) as client:
        sp.client = client  # type: ignore[attr-defined]
        yield sp
    assert sp.alive(), f"the server died; see {log}"
    sp.stop()
    assert "Traceback" not in log.read_text(), f"the server logged an unexpected exception; see {log}"


def _post(sp, path: str, body) -> int:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = sp.client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
        assert err["type"] == "invalid_request_error" or r.status_code in (404, 413), err
        assert "Traceback" not in err["message"]
    else:
        assert r.json()["choices"], r.text[:300]
    return r.status_code


def _still_serves(sp) -> None:
    r = sp.client.post("/v1/completions", json={"prompt": "it was", "echo": True, "logprobs": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["tokens"]


def _embeds(rows: int, dim: int) -> str:
    buf = io.BytesIO()
    torch.save(torch.zeros(rows, dim), buf)
    return base64.b64encode(buf.getvalue()).decode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20)
small_ints = st.integers(-3, 40) | st.integers(-2**40, 2**40)
token_ids = st.lists(st.integers(-5, 40_000), min_size=0, max_size=6)
COMPLETION_FIELDS = ["model", "prompt", "prompt_embeds", "max_tokens", "logprobs", "prompt_logprobs", "echo",
                     "logprob_token_ids", "logit_bias", "allowed_token_ids", "n", "stream", "best_of", "suffix",
                     "return_tokens_as_token_ids", "temperature"]
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "logit_bias",
               "allowed_token_ids", "n", "stream", "chat_template", "add_generation_prompt"]


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), value=json_values)
def test_arbitrary_json_bodies(face_server, path, value):
    _post(face_server, path, value)


@FUZZ
@given(field=st.sampled_from(COMPLETION_FIELDS), value=json_values)
def test_completion_with_one_field_replaced(face_server, field, value):
    body = {"prompt": ["it was", "a film"], "max_tokens": 1, "logprobs": 2, "echo": True}
    body[field] = value
    _post(face_server, "/v1/completions", body)


@FUZZ
@given(field=st.sampled_from(CHAT_FIELDS), value=json_values)
def test_chat_with_one_field_replaced(face_server, field, value):
    body = {"messages": [{"role": "user", "content": "it was"}], "logprobs": True, "top_logprobs": 2}
    body[field] = value
    _post(face_server, "/v1/chat/completions", body)


@FUZZ
@given(prompt=st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=4), token_ids,
                        st.lists(token_ids, max_size=3)),
       echo=st.booleans(), logprobs=st.none() | small_ints, prompt_logprobs=st.none() | small_ints,
       max_tokens=st.none() | st.integers(-1, 3), exact=st.none() | token_ids,
       allowed=st.none() | token_ids, bias=st.none() | st.dictionaries(st.integers(-2, 40_000).map(str),
                                                                      st.floats(-200, 200), max_size=3))
def test_plausible_completion_bodies(face_server, prompt, echo, logprobs, prompt_logprobs, max_tokens, exact,
                                     allowed, bias):
    body = {"prompt": prompt, "echo": echo, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
            "max_tokens": max_tokens, "logprob_token_ids": exact, "allowed_token_ids": allowed, "logit_bias": bias}
    _post(face_server, "/v1/completions", {k: v for k, v in body.items() if v is not None})


@FUZZ
@given(rows=st.integers(0, 3), dim=st.sampled_from([31, 32, 33]), echo=st.booleans(),
       prompt_logprobs=st.none() | st.integers(-1, 3), prompt=st.sampled_from([None, "", "x", [""]]))
def test_prompt_embeds_with_other_fields(face_server, rows, dim, echo, prompt_logprobs, prompt):
    body = {"prompt_embeds": [_embeds(rows, dim)], "echo": echo, "logprobs": 1}
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs
    if prompt is not None:
        body["prompt"] = prompt
    _post(face_server, "/v1/completions", body)


@pytest.mark.parametrize("raw", [b'{"prompt": ', b"[" * 10_000 + b"]" * 10_000, b"\xff\xfe", b'"just a string"',
                                 b'{"prompt": "x", "logprobs": 1e400}'])
def test_unparseable_bodies(face_server, raw):
    assert _post(face_server, "/v1/completions", raw) == 400
    assert _post(face_server, "/v1/chat/completions", raw) == 400
    _still_serves(face_server)
