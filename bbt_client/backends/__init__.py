"""Endpoint backends: our server protocol, vLLM prompt embeddings, OpenAI-compatible text APIs.

:func:`make_backend` is the one constructor the CLI and :mod:`bbt_client.run.job` use.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from bbt_client.backends.base import Backend, PromptBatch, ScoreJob, ScoreResult
from bbt_client.backends.http import HttpEndpoint, RetryPolicy
from bbt_client.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from bbt_client.config import EndpointConfig

BACKEND_KINDS = ("server", "vllm", "openai")


def make_backend(endpoint: "EndpointConfig | str", url: str | None = None, *, api_key: str | None = None,
                 **opts: Any) -> Backend:
    """Build the backend an endpoint config describes.

    Two call forms: ``make_backend(endpoint_config, api_key=None, **overrides)`` (what the job uses), or
    ``make_backend("server"|"vllm"|"openai", url, **opts)``. The key, when not given, is read from the
    environment variable ``endpoint_config.api_key_env`` (default ``BBT_API_KEY``); ``opts`` override
    ``endpoint_config.options`` (e.g. ``embeddings_from``, ``model`` for vLLM; ``retry`` a RetryPolicy).
    """
    if isinstance(endpoint, str):
        kind = endpoint
        if url is None:
            raise ConfigError(f"make_backend({kind!r}, url) needs the endpoint url")
        common = dict(api_key_env=opts.pop("api_key_env", "BBT_API_KEY"), timeout_s=opts.pop("timeout_s", 120.0),
                      max_concurrency=opts.pop("max_concurrency", 4), max_retries=opts.pop("max_retries", 5))
    else:
        kind, url = endpoint.backend, endpoint.url
        common = dict(api_key_env=endpoint.api_key_env, timeout_s=endpoint.timeout_s,
                      max_concurrency=endpoint.max_concurrency, max_retries=endpoint.max_retries)
        opts = {**endpoint.options, **opts}
    retry = opts.pop("retry", None) or RetryPolicy(max_retries=common["max_retries"])
    if kind == "server":
        from bbt_client.backends.server import ServerBackend

        prompt_dtype = opts.pop("prompt_dtype", "float32")
        _refuse_unknown(kind, opts)
        return ServerBackend(url, api_key, api_key_env=common["api_key_env"], timeout=common["timeout_s"],
                             max_concurrency=common["max_concurrency"], retry=retry, prompt_dtype=prompt_dtype)
    if kind == "vllm":
        from bbt_client.backends.vllm import VLLMBackend

        _refuse_unknown(kind, opts, VLLMBackend)
        return VLLMBackend(url, api_key=api_key, api_key_env=common["api_key_env"], timeout=common["timeout_s"],
                           max_concurrency=common["max_concurrency"], retry=retry, **opts)
    if kind == "openai":
        from bbt_client.backends.openai_text import OpenAITextBackend

        _refuse_unknown(kind, opts, OpenAITextBackend)
        return OpenAITextBackend(url, api_key=api_key, api_key_env=common["api_key_env"],
                                 timeout=common["timeout_s"], max_concurrency=common["max_concurrency"],
                                 retry=retry, **opts)
    raise ConfigError(f"unknown backend kind {kind!r}; choose one of: {', '.join(BACKEND_KINDS)}")


#: Constructor arguments that come from the endpoint config itself, not from ``options``.
_COMMON = {"base_url", "api_key", "api_key_env", "timeout", "max_concurrency", "max_retries", "retry", "http",
           "embeddings", "self"}


def _refuse_unknown(kind: str, opts: dict[str, Any], cls: type | None = None) -> None:
    allowed = set()
    if cls is not None:
        allowed = set(inspect.signature(cls.__init__).parameters) - _COMMON
    unknown = sorted(set(opts) - allowed)
    if unknown:
        hint = f"; it accepts: {', '.join(sorted(allowed))}" if allowed else ""
        raise ConfigError(f"the {kind!r} backend takes no option(s) {', '.join(unknown)}{hint}")


__all__ = ["Backend", "PromptBatch", "ScoreJob", "ScoreResult", "HttpEndpoint", "RetryPolicy", "make_backend",
           "BACKEND_KINDS"]
