"""A fake OpenAI-compatible server for tests, drills and benchmarks: a real HTTP server on
127.0.0.1 (Starlette on uvicorn) speaking the chat-completions wire protocol, with structured
output (``response_format`` json_schema), usage counts, and fault injection.

Faults, set globally or per model (rates are probabilities per request, drawn from a seeded RNG;
a ``script`` forces the next outcomes in order, then rates apply again):

    latency_ms           added to every answer
    rate_500             HTTP 500
    rate_429             HTTP 429 with Retry-After: retry_after_s
    rate_hang            no answer for hang_s (longer than the client's timeout)
    rate_malformed       HTTP 200 with a truncated JSON body
    rate_truncated       valid body whose message content is truncated JSON
    rate_schema          valid JSON content that violates the response schema
    draft_text           the text every draft answer carries (to test outbound policy checks)
    script               e.g. ["500", "429", "ok", "hang", "malformed", "truncated", "schema", "quota"]

Answers are deterministic: the triage label is the allowed label (from the schema's enum or the
"Allowed intents:" line) sharing most word stems with the message; a draft is assembled from the
system prompt's article. Every request body is kept (``requests()``) so tests can check what left
the process, e.g. that no personal data did.

In-process:   with FakeOpenAI() as srv: srv.base_url ...; srv.configure(rate_500=0.2)
Subprocess:   python -m orch_project_tests.fake_openai --port 8089 --latency-ms 200
              (prints ``listening on http://127.0.0.1:PORT/v1``; POST /_control/config to change faults)
              or, from Python: with spawn(seed=1, rate_500=0.2) as base_url: ...; requests_log(base_url)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTCOMES = ("ok", "500", "429", "hang", "malformed", "truncated", "schema", "quota")


@dataclass
class Faults:
    latency_ms: float = 0.0
    rate_500: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    rate_hang: float = 0.0
    hang_s: float = 5.0
    rate_malformed: float = 0.0
    rate_truncated: float = 0.0
    rate_schema: float = 0.0
    draft_text: str | None = None  # when set, every draft answer carries this text
    script: list[str] = field(default_factory=list)

    def update(self, **kw: Any) -> None:
        for k, v in kw.items():
            if not hasattr(self, k):
                raise ValueError(f"unknown fault setting {k!r}")
            if k == "script":
                bad = [o for o in v if o not in OUTCOMES]
                if bad:
                    raise ValueError(f"unknown scripted outcome(s) {bad}; use {OUTCOMES}")
                v = list(v)
            setattr(self, k, v)

    def draw(self, rng: random.Random) -> str:
        if self.script:
            return self.script.pop(0)
        x = rng.random()
        for outcome, rate in (("500", self.rate_500), ("429", self.rate_429), ("hang", self.rate_hang),
                              ("malformed", self.rate_malformed), ("truncated", self.rate_truncated),
                              ("schema", self.rate_schema)):
            if x < rate:
                return outcome
            x -= rate
        return "ok"


def _stems(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2}


def choose_label(labels: list[str], text: str) -> str:
    words = _stems(text)
    best = max(labels, key=lambda lab: (len(_stems(lab.replace("_", " ")) & words), -labels.index(lab)))
    return best


def _allowed_labels(body: dict[str, Any]) -> list[str]:
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema") or {}
    enum = ((schema.get("properties") or {}).get("label") or {}).get("enum")
    if enum:
        return list(enum)
    for m in body.get("messages", []):
        found = re.search(r"Allowed intents:\s*(.+)", m.get("content") or "")
        if found:
            return [x.strip() for x in found.group(1).split(",") if x.strip()]
    return []


def answer(body: dict[str, Any]) -> dict[str, Any]:
    """What a well-behaved model would return for this request."""
    messages = body.get("messages", [])
    system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
    user = "\n".join(m.get("content") or "" for m in messages if m.get("role") == "user")
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
    props = schema.get("properties") or {}
    labels = _allowed_labels(body)
    if "line_items" in props and "total" in props:  # a document extraction
        return extraction_answer(user)
    if "text" in props:  # a draft
        title = re.search(r"Article \S+: (.+)", system)
        sign = re.search(r"Sign the reply as (.+?)\.?$", system, flags=re.M)
        steps = re.findall(r"^\d+\. .+$", system, flags=re.M)
        text = (f"Hello,\n\nThank you for getting in touch about {title.group(1).lower() if title else 'your request'}."
                f"\n\n" + "\n".join(steps[:4]) + f"\n\nKind regards,\n{sign.group(1) if sign else 'Support'}")
        return {"label": labels[0] if labels else "draft_reply", "confidence": 0.9, "text": text}
    label = choose_label(labels, user) if labels else "unknown"
    return {"label": label, "confidence": 0.8}


def extraction_answer(user: str) -> dict[str, Any]:
    """A plausible model answer for a document given as "[n] text" lines: the first line as the vendor,
    the amount on the last TOTAL line as the total, the first day-first date; the rest unknown."""
    lines = re.findall(r"^\[(\d+)\] (.*)$", user, flags=re.M)
    empty = {"value": None, "confidence": 0.0, "lines": []}
    out: dict[str, Any] = {f: dict(empty) for f in ("vendor", "address", "tax_id", "number", "date", "currency",
                                                    "subtotal", "tax", "total")}
    out["line_items"] = []
    if lines:
        out["vendor"] = {"value": lines[0][1].strip(), "confidence": 0.8, "lines": [int(lines[0][0])]}
    for n, text in lines:
        d = re.search(r"(\d{1,2})[./](\d{1,2})[./](\d{4})", text)
        if d and out["date"]["value"] is None:
            out["date"] = {"value": f"{d.group(3)}-{int(d.group(2)):02d}-{int(d.group(1)):02d}", "confidence": 0.7,
                           "lines": [int(n)]}
        t = re.search(r"total\b.*?([\d,]+\.\d{2})\s*$", text, flags=re.I)
        if t and "sub" not in text.lower():
            out["total"] = {"value": t.group(1).replace(",", ""), "confidence": 0.85, "lines": [int(n)]}
    return out


class FakeOpenAI:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0, **faults: Any):
        self.host = host
        self.port = port
        self.faults = Faults()
        self.faults.update(**faults)
        self.model_faults: dict[str, Faults] = {}
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self._log: list[dict[str, Any]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    # -- control ---------------------------------------------------------------------
    def configure(self, model: str | None = None, **kw: Any) -> None:
        with self._lock:
            if model is None:
                self.faults.update(**kw)
            else:
                self.model_faults.setdefault(model, Faults()).update(**kw)

    def reset(self) -> None:
        with self._lock:
            self.faults = Faults()
            self.model_faults.clear()
            self._log.clear()
            self.peak_in_flight = self.in_flight

    def requests(self, model: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self._log if model is None or r["model"] == model]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- HTTP ------------------------------------------------------------------------
    def app(self):
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        async def completions(request: Request):
            raw = await request.body()
            try:
                body = json.loads(raw)
            except ValueError:
                return JSONResponse({"error": {"message": "request body is not JSON", "type": "invalid_request_error"}},
                                    status_code=400)
            model = str(body.get("model", ""))
            with self._lock:
                faults = self.model_faults.get(model, self.faults)
                outcome = faults.draw(self.rng)
                latency, retry_after, hang_s = faults.latency_ms, faults.retry_after_s, faults.hang_s
                record = {"t": time.time(), "model": model, "outcome": outcome, "body": body,
                          "authorization": request.headers.get("authorization", "")}
                self._log.append(record)
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                if latency:
                    await asyncio.sleep(latency / 1000.0)
                if outcome == "hang":
                    await asyncio.sleep(hang_s)
                    return JSONResponse({"error": {"message": "too late", "type": "server_error"}}, status_code=504)
                if outcome == "500":
                    return JSONResponse({"error": {"message": "The server had an error while processing your request.",
                                                   "type": "server_error"}}, status_code=500)
                if outcome == "429":
                    return JSONResponse({"error": {"message": "Rate limit reached for requests",
                                                   "type": "requests", "code": "rate_limit_exceeded"}},
                                        status_code=429, headers={"retry-after": f"{retry_after:g}"})
                if outcome == "quota":
                    return JSONResponse({"error": {"message": "You exceeded your current quota.",
                                                   "type": "insufficient_quota", "code": "insufficient_quota"}},
                                        status_code=429, headers={"x-should-retry": "false"})
                content_obj = answer(body)
                if faults.draft_text is not None and "text" in content_obj:
                    content_obj["text"] = faults.draft_text
                if outcome == "schema":
                    content_obj = {"label": 12345, "confidence": 7.5}
                content = json.dumps(content_obj)
                if outcome == "truncated":
                    content = content[: max(1, len(content) // 2)]
                prompt_tokens = sum(len(m.get("content") or "") for m in body.get("messages", [])) // 4 + \
                    4 * len(body.get("messages", []))
                completion_tokens = len(content) // 4 + 1
                payload = {
                    "id": f"chatcmpl-{len(self._log)}", "object": "chat.completion", "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                 "message": {"role": "assistant", "content": content, "refusal": None}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                }
                text = json.dumps(payload)
                if outcome == "malformed":
                    text = text[: len(text) // 2]
                return Response(text, media_type="application/json")
            finally:
                with self._lock:
                    self.in_flight -= 1

        async def models(_request):
            return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"},
                                                            {"id": "gpt-4.1-mini", "object": "model"}]})

        async def control_config(request: Request):
            body = await request.json()
            try:
                self.configure(body.pop("model", None), **body)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return JSONResponse({"ok": True})

        async def control_requests(_request):
            return JSONResponse({"requests": self.requests(), "peak_in_flight": self.peak_in_flight})

        async def control_reset(_request):
            self.reset()
            return JSONResponse({"ok": True})

        return Starlette(routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/_control/config", control_config, methods=["POST"]),
            Route("/_control/requests", control_requests, methods=["GET"]),
            Route("/_control/reset", control_reset, methods=["POST"]),
        ])

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        return sock

    def _config(self):
        import uvicorn

        return uvicorn.Config(self.app(), log_level="warning", access_log=False, lifespan="off",
                              timeout_keep_alive=30, limit_concurrency=None)

    def start(self) -> "FakeOpenAI":
        import uvicorn

        self._sock = self._bind()
        self._server = uvicorn.Server(self._config())
        # Server.run picks uvloop when installed; a plain asyncio loop adds ~40 ms per keep-alive request here
        self._thread = threading.Thread(target=lambda: self._server.run(sockets=[self._sock]),
                                        name="fake-openai", daemon=True)
        self._thread.start()
        deadline = time.time() + 10
        while not self._server.started:
            if time.time() > deadline:
                raise RuntimeError("fake OpenAI server did not start within 10 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def spawn(**faults: Any) -> Iterator[str]:
    """The server in a subprocess (``python -m orch_project_tests.fake_openai --port 0``); yields its
    base URL (``http://127.0.0.1:PORT/v1``) and terminates it at exit. ``faults`` are the command-line
    options by their Python names, e.g. ``seed=3, latency_ms=200, rate_500=0.2``."""
    cmd = [sys.executable, "-m", "orch_project_tests.fake_openai", "--port", "0"]
    for k, v in faults.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            proc.kill()
            raise SystemExit(f"fake OpenAI server did not start: {line!r}")
        yield line.removeprefix("listening on ")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def requests_log(base_url: str) -> dict[str, Any]:
    """``GET /_control/requests`` of a running server: {"requests": [...], "peak_in_flight": N}."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_control/requests") as resp:
        return json.load(resp)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description="Fake OpenAI-compatible server with fault injection (for tests)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (printed on start)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    for name in ("rate_500", "rate_429", "rate_hang", "rate_malformed", "rate_truncated", "rate_schema",
                 "retry_after_s", "hang_s"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    args = ap.parse_args(argv)
    faults = {k: v for k, v in vars(args).items()
              if k.startswith(("rate_", "retry_", "hang_")) and v is not None}
    srv = FakeOpenAI(host=args.host, port=args.port, seed=args.seed, latency_ms=args.latency_ms, **faults)
    sock = srv._bind()
    print(f"listening on {srv.base_url}", flush=True)
    uvicorn.Server(srv._config()).run(sockets=[sock])


if __name__ == "__main__":
    main()
