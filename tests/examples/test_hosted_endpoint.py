"""examples/hosted_endpoint.py against a respx fake of vLLM (Completions + ``prompt_embeds``), offline.

What this covers: environment-variable handling, --dry-run (no scoring request), and a full BBT run
whose requests follow vLLM's documented format (base64 torch tensors, ``allowed_token_ids``, bearer key)
with answers that depend on the prompt. What it does not: a real vLLM engine. The OpenAI text path runs against the real server's OpenAI face.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import respx

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402

from bbt_client.run.results import load_result  # noqa: E402

URL = "http://vllm.test"
D = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    """A 'local copy' of a causal model: MiniLM's tokenizer and a random (V, 16) embedding matrix."""
    d = tmp_path_factory.mktemp("tiny_causal")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((default_model_dir / name).read_bytes())
    (d / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"], "num_hidden_layers": 2,
                                               "max_position_embeddings": 512}))
    rng = np.random.default_rng(0)
    save_file({"model.embed_tokens.weight": rng.normal(size=(30522, D)).astype(np.float32)},
              str(d / "model.safetensors"))
    return d


def fake_vllm(seen: list):
    """Label logprobs = log-softmax over the asked tokens (``allowed_token_ids`` or ``logprob_token_ids``) of
    (mean input row) · W: they move with the prompt. A text prompt (the probe asks the logprobs cap with one)
    reads as a zero row; a request that names no ids gets two fixed ones."""
    W = np.random.default_rng(1).normal(size=(D, 30522))  # one column per token id: any ids can be asked

    def handle(request):
        body = json.loads(request.content)
        seen.append((request.headers.get("authorization"), body))
        ids = body.get("allowed_token_ids") or body.get("logprob_token_ids") or [1000, 1001]
        choices = []
        rows = body.get("prompt_embeds") or [None]
        for i, b64 in enumerate(rows):
            t = (np.zeros((1, D)) if b64 is None else
                 torch.load(io.BytesIO(base64.b64decode(b64)), weights_only=True).float().numpy())
            s = t.mean(axis=0) @ W[:, ids]
            lp = s - np.log(np.exp(s).sum())
            top = {f"token_id:{tid}": float(v) for tid, v in zip(ids, lp)}
            choices.append({"index": i, "text": "x", "finish_reason": "length",
                            "logprobs": {"tokens": ["x"], "token_logprobs": [max(top.values())],
                                         "top_logprobs": [top], "text_offset": [0]}})
        n = len(rows)
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "model": body["model"],
                                         "choices": choices, "usage": {"prompt_tokens": 10 * n,
                                                                       "completion_tokens": n,
                                                                       "total_tokens": 11 * n}})

    return handle


VARS = ("BBT_ENDPOINT", "BBT_BACKEND", "BBT_API_KEY", "BBT_MODEL", "BBT_EMBEDDINGS_FROM")


def set_env(monkeypatch, values: dict[str, str]) -> None:
    """The example reads os.environ (and so does the backend, for the key): set exactly these variables."""
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def run(monkeypatch, mod, argv: list[str], values: dict[str, str]) -> int:
    set_env(monkeypatch, values)
    return mod.main(argv)


def env(model_dir) -> dict[str, str]:
    return {"BBT_ENDPOINT": URL, "BBT_EMBEDDINGS_FROM": str(model_dir), "BBT_MODEL": "tiny",
            "BBT_API_KEY": "test-key"}


def test_missing_endpoint_variable(example, capsys, monkeypatch):
    assert run(monkeypatch, example("hosted_endpoint"), [], {}) == 2
    assert "set BBT_ENDPOINT" in capsys.readouterr().err


def test_vllm_needs_local_embeddings(example, capsys, monkeypatch):
    assert run(monkeypatch, example("hosted_endpoint"), [], {"BBT_ENDPOINT": URL}) == 2
    assert "BBT_EMBEDDINGS_FROM" in capsys.readouterr().err


def test_openai_needs_model_and_bad_backend_refused(example, capsys, monkeypatch):
    mod = example("hosted_endpoint")
    assert run(monkeypatch, mod, [], {"BBT_ENDPOINT": URL, "BBT_BACKEND": "openai"}) == 2
    assert "BBT_MODEL" in capsys.readouterr().err
    assert run(monkeypatch, mod, [], {"BBT_ENDPOINT": URL, "BBT_BACKEND": "tgi"}) == 2
    assert "BBT_BACKEND must be vllm or openai" in capsys.readouterr().err


def test_dry_run_sends_nothing(example, model_dir, capsys, monkeypatch):
    mod = example("hosted_endpoint")
    with respx.mock(assert_all_called=False) as mock:
        route = mock.post(f"{URL}/v1/completions")
        rc = run(monkeypatch, mod, ["--dry-run", "--shots", "2", "--popsize", "4"], env(model_dir))
    assert rc == 0 and not route.called
    text = capsys.readouterr().out
    assert "supported_prompts" in text and "['none', 'shallow']" in text
    assert "calls_per_generation   4" in text and "tokens_per_generation" in text


def test_tunes_against_fake_vllm(example, model_dir, tmp_path, capsys, monkeypatch):
    mod = example("hosted_endpoint")
    seen: list = []
    with respx.mock as mock:
        mock.post(f"{URL}/v1/completions").mock(side_effect=fake_vllm(seen))
        mock.get(f"{URL}/v1/models").respond(json={"object": "list", "data": [{"id": "tiny"}]})
        rc = run(monkeypatch, mod, ["--shots", "2", "--popsize", "4", "--budget-calls", "24", "--test-limit", "6",
                       "--out", str(tmp_path / "run")], env(model_dir))
    assert rc == 0, capsys.readouterr().err
    result = load_result(tmp_path / "run")
    assert result.method == "bbt" and result.model == "tiny"
    assert result.prompt_shape == ([0] if result.bare_template else [5, D])  # 2-shot dev: the template may win
    assert 0 < result.api_calls_used <= 24 and result.tokens_used > 0
    assert all(auth == "Bearer test-key" for auth, _ in seen)
    shapes = set()
    for _, body in seen:
        assert body["max_tokens"] == 1 and body["model"] == "tiny"
        for b64 in body.get("prompt_embeds", []):
            shapes.add(torch.load(io.BytesIO(base64.b64decode(b64)), weights_only=True).shape[1])
    assert shapes == {D}
    out = capsys.readouterr().out
    assert "via vllm (tiny)" in out
    assert ("no tuned prompt beat the bare template on dev" in out) == result.bare_template
    assert result.scoring["strategy"] == "logprob_token_ids" and result.label_score_coverage == 1.0


@pytest.mark.slow
def test_tunes_a_text_prompt_through_the_servers_openai_face(example, live_server, tmp_path, capsys, monkeypatch):
    """BBT_BACKEND=openai: a text API gets a tuned discrete prompt (bdpl), printed for pasting into any client."""
    mod = example("hosted_endpoint")
    rc = run(monkeypatch, mod, ["--task", "agnews", "--template", "{text} Topic: {mask}", "--shots", "2",
                                "--popsize", "4", "--prompt-tokens", "2", "--budget-calls", "12", "--test-limit", "8",
                                "--out", str(tmp_path / "run")],
             {"BBT_ENDPOINT": live_server, "BBT_BACKEND": "openai", "BBT_MODEL": "all-MiniLM-L6-v2"})
    assert rc == 0, capsys.readouterr().err
    result = load_result(tmp_path / "run")
    assert result.method == "bdpl" and result.prompt_kind == "text" and result.api_calls_used <= 12
    out = capsys.readouterr().out
    assert result.prompt_text is not None
    if result.prompt_text:
        assert f"tuned prompt (put it before each input): {result.prompt_text!r}" in out
    else:  # the bare template won on dev (2-shot): that is said, not printed as an empty prompt
        assert "no tuned prompt beat the bare template on dev" in out and result.best_generation == 0
