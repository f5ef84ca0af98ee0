"""Echo, prompt log-probs, token-id prompts, ``logprob_token_ids`` and chat templates on the OpenAI/vLLM face,
checked against the model's own numbers computed here with transformers (no server code involved).

Causal LM (tiny Llama): a prompt token's log-prob is the ordinary teacher-forced one. Masked LM (tiny BERT): its
pseudo-log-likelihood term, the token's log-prob with that position masked.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from server_stub.http.routes_openai import NO_CHAT_TEMPLATE, REQUEST_CHAT_TEMPLATE
from server_stub.testing import run_server

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    with run_server(tiny_llama_dir, threads=1, max_logprobs=5) as url:
        yield url


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def hf_bert(tiny_bert_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    return AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).eval(), AutoTokenizer.from_pretrained(tiny_bert_dir)


def complete(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def refused(url: str, path: str, body: dict, says: str) -> None:
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"], r.text


def causal_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(S, V) log-softmax of the causal model's logits after each prefix."""
    model, _ = hf
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def test_causal_echo_is_the_teacher_forced_logprob(llama, hf_llama):
    ids = hf_llama[1](PROMPT)["input_ids"]
    assert ids[0] == 101 and ids[-1] != 102  # one BOS, no trailing [SEP]
    lp = causal_logprobs(hf_llama, ids)
    c = complete(llama, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, return_tokens_as_token_ids=True)
    (choice,) = c["choices"]
    got = choice["logprobs"]
    assert got["tokens"] == [f"token_id:{i}" for i in ids] and choice["text"] == PROMPT
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    want = [float(lp[j - 1, ids[j]]) for j in range(1, len(ids))]
    np.testing.assert_allclose(got["token_logprobs"][1:], want, atol=1e-4)
    for j in range(1, len(ids)):  # the actual token first, then the top-1
        top = got["top_logprobs"][j]
        assert list(top)[0] == f"token_id:{ids[j]}" and f"token_id:{int(lp[j - 1].argmax())}" in top
    lengths = [len(t) for t in got["tokens"]]
    assert got["text_offset"] == [sum(lengths[:j]) for j in range(len(ids))]
    assert c["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
    # max_tokens 1 appends the greedy token to every array and to the text
    one = complete(llama, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1)["choices"][0]
    assert len(one["logprobs"]["tokens"]) == len(ids) + 1
    assert one["logprobs"]["token_logprobs"][-1] == pytest.approx(float(lp[-1].max()), abs=1e-4)
    assert one["text"].startswith(PROMPT) and len(one["text"]) > len(PROMPT)


def test_prompt_logprobs_give_rank_and_top_n(llama, hf_llama):
    ids = hf_llama[1](PROMPT)["input_ids"]
    lp = causal_logprobs(hf_llama, ids)
    choice = complete(llama, prompt=PROMPT, max_tokens=1, prompt_logprobs=2)["choices"][0]
    assert choice["logprobs"] is None
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for j in range(1, len(ids)):
        entry = plp[j]
        row = lp[j - 1]
        assert entry[str(ids[j])]["rank"] == int((row > row[ids[j]]).sum()) + 1
        assert entry[str(ids[j])]["logprob"] == pytest.approx(float(row[ids[j]]), abs=1e-4)
        best = [int(i) for i in torch.topk(row, 2).indices]
        assert [entry[str(b)]["rank"] for b in best] == [1, 2] and len(entry) == len({ids[j], *best})
    refused(llama, "/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 6}, "Requested prompt logprobs of 6")


def test_token_id_prompts_are_used_verbatim(llama, hf_llama):
    ids = hf_llama[1](PROMPT)["input_ids"]
    text = complete(llama, prompt=PROMPT, logprobs=3)["choices"][0]["logprobs"]["top_logprobs"][0]
    one = complete(llama, prompt=ids, logprobs=3)["choices"][0]["logprobs"]["top_logprobs"][0]
    assert one == pytest.approx(text, abs=1e-5)  # the text's ids include BOS; ids are not given another
    many = complete(llama, prompt=[ids, ids[1:]], logprobs=3, echo=True, max_tokens=0)
    assert many["usage"]["prompt_tokens"] == 2 * len(ids) - 1
    no_bos = many["choices"][1]["logprobs"]
    assert no_bos["token_logprobs"][0] is None and len(no_bos["tokens"]) == len(ids) - 1
    assert many["choices"][0]["text"] == "[CLS] " + PROMPT  # echoed ids are detokenized


def test_logprob_token_ids_are_exact_and_not_capped(llama, hf_llama):
    ids = hf_llama[1](PROMPT)["input_ids"]
    lp = causal_logprobs(hf_llama, ids)[-1]
    wanted = list(range(2000, 2012))  # more than --max-logprobs 5
    c = complete(llama, prompt=PROMPT, logprobs=1, logprob_token_ids=wanted, return_tokens_as_token_ids=True)
    top = c["choices"][0]["logprobs"]["top_logprobs"][0]
    sampled = int(lp.argmax())
    assert list(top) == [f"token_id:{i}" for i in [sampled, *wanted]]
    np.testing.assert_allclose([top[f"token_id:{i}"] for i in wanted], [float(lp[i]) for i in wanted], atol=1e-4)
    refused(llama, "/v1/completions", {"prompt": PROMPT, "logprob_token_ids": [5]}, "`logprobs` must be set")
    refused(llama, "/v1/completions", {"prompt": PROMPT, "logprobs": 1, "logprob_token_ids": [10**6]},
            "out-of-vocab token ids. Vocabulary size: 30522")


def test_masked_echo_is_the_pseudo_log_likelihood(tiny_server, hf_bert):
    model, tok = hf_bert
    ids = tok(PROMPT)["input_ids"]  # [CLS] ... [SEP]
    want = []
    for j in range(1, len(ids) - 1):
        x = list(ids)
        x[j] = tok.mask_token_id
        with torch.no_grad():
            want.append(float(torch.log_softmax(model(torch.tensor([x])).logits[0, j].double(), -1)[ids[j]]))
    before = httpx.get(tiny_server + "/v1/usage").json()
    c = complete(tiny_server, prompt=PROMPT, echo=True, logprobs=0, max_tokens=0)
    after = httpx.get(tiny_server + "/v1/usage").json()
    got = c["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None and got[-1] is None  # the [CLS] and [SEP] the server added are not scored
    np.testing.assert_allclose(got[1:-1], want, atol=1e-4)
    # metered: the next-token sequence and one masked copy per scored token; billed: the prompt's tokens
    assert after["sequences"] - before["sequences"] == 1 + len(want)
    assert after["tokens"] - before["tokens"] == (len(ids) + 1) + len(want) * len(ids)
    assert c["usage"]["prompt_tokens"] == len(ids)
    # the last token's term is the next-token answer after the prompt without it
    head = PROMPT.rsplit(" ", 1)[0]
    nxt = complete(tiny_server, prompt=head, logprobs=1, logprob_token_ids=[ids[-2]], return_tokens_as_token_ids=True)
    assert nxt["choices"][0]["logprobs"]["top_logprobs"][0][f"token_id:{ids[-2]}"] == pytest.approx(want[-1], abs=1e-5)


def test_masked_token_id_prompts_get_the_special_tokens(tiny_server, hf_bert):
    body = hf_bert[1](PROMPT, add_special_tokens=False)["input_ids"]
    text = complete(tiny_server, prompt=PROMPT, logprobs=3)
    ids = complete(tiny_server, prompt=body, logprobs=3)
    assert ids["choices"][0]["logprobs"]["top_logprobs"][0] == pytest.approx(
        text["choices"][0]["logprobs"]["top_logprobs"][0], abs=1e-5)
    assert ids["usage"]["prompt_tokens"] == len(body) == text["usage"]["prompt_tokens"] - 2


def test_chat_needs_a_template(llama, tiny_llama_dir):
    msgs = [{"role": "user", "content": PROMPT}]
    refused(llama, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1}, NO_CHAT_TEMPLATE)
    refused(llama, "/tokenize", {"messages": msgs}, NO_CHAT_TEMPLATE)
    refused(llama, "/v1/chat/completions", {"messages": msgs, "chat_template": "{{ messages }}"},
            REQUEST_CHAT_TEMPLATE)
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with run_server(tiny_llama_dir, threads=1, chat_template=template) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": msgs, "logprobs": True, "top_logprobs": 3},
                       timeout=60)
        assert r.status_code == 200, r.text
        chat = {t["token"]: t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
        plain = complete(url, prompt=PROMPT, logprobs=3)["choices"][0]["logprobs"]["top_logprobs"][0]
        assert chat == pytest.approx(plain, abs=1e-5)  # the template's BOS + text = the completion's tokens
        assert r.json()["usage"]["prompt_tokens"] == httpx.post(url + "/tokenize", json={"messages": msgs}).json()["count"]
