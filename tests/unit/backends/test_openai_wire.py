import pytest

from bbt_client.backends.openai_wire import CompletionResponse, first_top_logprobs, split_v1, usage_tokens
from bbt_client.errors import ProtocolError


def response(indices, usage=None):
    return CompletionResponse.model_validate({
        "choices": [{"index": i, "logprobs": {"top_logprobs": [{"a": -float(i)}]}} for i in indices],
        "usage": usage, "unexpected_field": True,
    })


def test_first_top_logprobs_follows_index_not_order():
    tops = first_top_logprobs(response([2, 0, 1]), 3, "prompts")
    assert tops == [{"a": 0.0}, {"a": -1.0}, {"a": -2.0}]


def test_first_top_logprobs_none_without_logprobs():
    resp = CompletionResponse.model_validate({"choices": [{"index": 0}, {"index": 1, "logprobs": {}}]})
    assert first_top_logprobs(resp, 2, "prompts") == [None, None]


@pytest.mark.parametrize("indices", [[0, 1], [0, 0, 1], [1, 2, 3]])
def test_first_top_logprobs_refuses_missing_or_repeated_choices(indices):
    with pytest.raises(ProtocolError, match="for 3 prompt embeddings"):
        first_top_logprobs(response(indices), 3, "prompt embeddings")


def test_usage_tokens_prefers_total_then_sums_then_zero():
    assert usage_tokens(response([0], {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 9}).usage) == 9
    assert usage_tokens(response([0], {"prompt_tokens": 5, "completion_tokens": 1}).usage) == 6
    assert usage_tokens(None) == 0


def test_split_v1():
    assert split_v1("http://h:8000/v1/") == "http://h:8000" == split_v1("http://h:8000")
