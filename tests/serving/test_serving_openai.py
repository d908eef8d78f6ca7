"""The ``openai`` fallback kind against a stand-in OpenAI-compatible server on loopback.

A double: no real OpenAI-compatible server (vLLM) can run on this CPU-only machine. The stand-in
speaks the parts of the protocol the backend uses: GET /models (vLLM's max_model_len), POST
/chat/completions and /completions with server-sent events, HTTP 400 for an over-long prompt.
"""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dgserve.engine.errors import ContextLengthExceededError, ContextVerificationError
from dgserve.serving.config import FallbackConfig
from dgserve.serving.fallback import OpenAIBackend
from dgserve.serving.messages import BackendRequest

pytestmark = pytest.mark.timeout(60)


class _Handler(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        assert self.path == "/v1/models"
        self._json({"data": [{"id": "gemma-4", "max_model_len": 8192}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        if len(str(body.get("messages") or body.get("prompt"))) > 1000:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "This model\'s maximum context length is 8192 tokens"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chat = self.path.endswith("/chat/completions")
        words = ["Hello", " from", " the", " fallback"][: body["max_tokens"]]
        for i, w in enumerate(words):
            last = i == len(words) - 1
            choice = {"delta": {"content": w}} if chat else {"text": w}
            choice["finish_reason"] = ("length" if len(words) == body["max_tokens"] else "stop") if last else None
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def _collect(backend, req):
    async def main():
        return [p async for p in backend.generate(req)]
    return asyncio.run(main())


def test_streams_chat_and_prompt_and_sends_the_key(server, monkeypatch):
    monkeypatch.setenv("FALLBACK_KEY", "sekrit")
    b = OpenAIBackend(FallbackConfig(kind="openai", url=server, model_name="gemma-4", api_key_env="FALLBACK_KEY"),
                      promised=4096)
    assert b.info().served_context_length == 8192  # what the server reports
    pieces = _collect(b, BackendRequest("r1", messages=(("user", "hi"),), max_new_tokens=8, seed=3))
    assert "".join(p.text for p in pieces) == "Hello from the fallback" and pieces[-1].finish_reason == "stop"
    pieces = _collect(b, BackendRequest("r2", prompt="hi", max_new_tokens=2))
    assert "".join(p.text for p in pieces) == "Hello from" and pieces[-1].finish_reason == "length"
    chat, prompt = _Handler.seen
    assert chat["path"] == "/v1/chat/completions" and chat["seed"] == 3 and chat["auth"] == "Bearer sekrit"
    assert prompt["path"] == "/v1/completions" and prompt["prompt"] == "hi"


def test_over_long_prompt_is_out_of_range(server):
    b = OpenAIBackend(FallbackConfig(kind="openai", url=server, model_name="gemma-4"), promised=4096)
    with pytest.raises(ContextLengthExceededError, match="maximum context length"):
        _collect(b, BackendRequest("r", prompt="x" * 2000, max_new_tokens=4))


def test_endpoint_serving_less_than_promised_is_refused(server):
    with pytest.raises(ContextVerificationError, match="serves a context of 8192 tokens, less than the promised 16384"):
        OpenAIBackend(FallbackConfig(kind="openai", url=server, model_name="gemma-4"), promised=16384)
