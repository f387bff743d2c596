"""The OpenAI-compatible provider: the official ``openai`` SDK over HTTP, so it works against
OpenAI, Azure OpenAI (OpenAI-compatible endpoint), vLLM, Ollama or any server speaking
/v1/chat/completions. Configured the way the SDK's users expect: OPENAI_BASE_URL and
OPENAI_API_KEY (the key is never logged, stored or put in metadata).

Retries are the SDK's: exponential backoff with jitter that honours Retry-After, on connection
errors, timeouts, 408/409/429 and 5xx. What the SDK raises after its retries is classified into
the step contract's errors. Malformed JSON bodies and content that is not JSON are NOT OpenAIError
subclasses; they are caught here: a malformed body is retried once (transport fault), then it and
non-JSON content are classified as ``schema_mismatch`` with the raw reason.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from .gateway import ProviderResult

# A truncated response body is a transport fault: one immediate retry before it counts as a schema
# mismatch (which then gets the gateway's one repair attempt, then the dead-letter queue).
MALFORMED_BODY_RETRIES = 1
_CLIENTS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def _client(base_url: str | None, api_key: str, max_retries: int, timeout_s: float):
    import openai

    key = (base_url, api_key, max_retries, timeout_s)
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = openai.OpenAI(base_url=base_url or None, api_key=api_key, max_retries=max_retries,
                                   timeout=timeout_s)
            _CLIENTS[key] = client
        return client


def reset_clients() -> None:
    with _LOCK:
        for c in _CLIENTS.values():
            c.close()
        _CLIENTS.clear()


class OpenAIProvider:
    name = "openai"
    batch = False  # one HTTP call per item; the gateway runs them concurrently

    def __init__(self, *, api_key: str, base_url: str | None = None, max_retries: int = 2, timeout_s: float = 30.0):
        if not api_key:
            raise ValueError("OPENAI_API_KEY is empty: set it (any value for a local OpenAI-compatible server)")
        self._api_key = api_key
        self.base_url = base_url
        self.max_retries = max_retries
        self.timeout_s = timeout_s

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIProvider(base_url={self.base_url!r})"

    def call(self, *, model: str, messages: list[dict[str, str]], schema_name: str, schema: dict[str, Any],
             max_tokens: int, timeout_s: float | None = None) -> ProviderResult:
        import openai

        client = _client(self.base_url, self._api_key, self.max_retries, self.timeout_s)
        if timeout_s is not None:
            client = client.with_options(timeout=timeout_s)
        t0 = time.perf_counter()

        def done(**kw) -> ProviderResult:
            return ProviderResult(latency_ms=(time.perf_counter() - t0) * 1000.0, **kw)

        try:
            for attempt in range(1 + MALFORMED_BODY_RETRIES):
                try:
                    resp = client.chat.completions.create(
                        model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                        response_format={"type": "json_schema",
                                         "json_schema": {"name": schema_name, "schema": schema, "strict": False}},
                    )
                    break
                except ValueError:  # a body cut off in transit: the SDK does not retry it, we do once
                    if attempt == MALFORMED_BODY_RETRIES:
                        raise
        except openai.APITimeoutError:
            return done(output=None, error="timeout", reason=f"no answer within {timeout_s or self.timeout_s:g} s "
                                                             f"after {self.max_retries} retries")
        except openai.RateLimitError as exc:
            code = _error_code(exc)
            if code == "insufficient_quota":
                return done(output=None, error="quota_exceeded", reason="provider quota exhausted (429 insufficient_quota)")
            return done(output=None, error="rate_limited", reason=f"429 after {self.max_retries} retries")
        except openai.APIStatusError as exc:
            return done(output=None, error="provider_error", reason=f"HTTP {exc.status_code}: {_short(exc.message)}")
        except openai.APIConnectionError as exc:
            return done(output=None, error="provider_error", reason=f"connection failed: {_short(str(exc))}")
        except ValueError as exc:  # json.JSONDecodeError: a malformed response body (not an OpenAIError)
            return done(output=None, error="schema_mismatch",
                        reason=f"malformed JSON response body (after {MALFORMED_BODY_RETRIES} retry): {_short(str(exc))}")
        if isinstance(resp, str) or not getattr(resp, "choices", None):
            return done(output=None, error="schema_mismatch", reason="response without choices")
        usage = getattr(resp, "usage", None)
        tin = int(getattr(usage, "prompt_tokens", 0) or 0)
        tout = int(getattr(usage, "completion_tokens", 0) or 0)
        choice = resp.choices[0]
        content = choice.message.content or ""
        if choice.finish_reason == "length":
            return done(output=None, input_tokens=tin, output_tokens=tout, error="schema_mismatch",
                        reason=f"answer cut off at max_tokens={max_tokens}", raw=content)
        try:
            parsed = json.loads(content)
        except ValueError as exc:
            return done(output=None, input_tokens=tin, output_tokens=tout, error="schema_mismatch",
                        reason=f"content is not valid JSON ({exc.msg} at char {exc.pos})", raw=content)
        if not isinstance(parsed, dict):
            return done(output=None, input_tokens=tin, output_tokens=tout, error="schema_mismatch",
                        reason=f"content is JSON {type(parsed).__name__}, expected an object", raw=content)
        return done(output=parsed, input_tokens=tin, output_tokens=tout, raw=content)


def _error_code(exc) -> str | None:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return err.get("code") or err.get("type")
    return None


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"
