"""gptoss_serve_auth: the key on every route but /health and /metrics, driven as an ASGI app is."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from gptoss_cloud.backends.local_serve import MIDDLEWARE_DIR


def load():
    spec = importlib.util.spec_from_file_location("gptoss_serve_auth", MIDDLEWARE_DIR / "gptoss_serve_auth.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def call(mw, path: str, *, auth: bytes | None = None, kind: str = "http", method: str = "POST"):
    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def receive():
        return {"type": "http.request"}

    async def send(msg):
        sent.append(msg)

    headers = [(b"authorization", auth)] if auth is not None else []
    asyncio.run(mw(app)({"type": kind, "path": path, "method": method, "headers": headers}, receive, send))
    return reached, sent


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/invocations", "/tokenize", "/detokenize", "/pooling", "/v1/models", "/ping"])
def test_model_routes_need_the_key(path, monkeypatch):
    mod = load()
    monkeypatch.setenv("VLLM_API_KEY", "k1")
    for auth in (None, b"Bearer nope", b"k1", b"Basic k1"):
        reached, sent = call(mod.ApiKeyMiddleware, path, auth=auth)
        assert not reached and sent[0]["status"] == 401, (path, auth)
    assert call(mod.ApiKeyMiddleware, path, auth=b"Bearer k1")[0] == [path]


def test_probes_and_metrics_are_open_and_websockets_are_guarded(monkeypatch):
    mod = load()
    monkeypatch.setenv("VLLM_API_KEY", "k1")
    for path in ("/health", "/metrics"):
        assert call(mod.ApiKeyMiddleware, path, method="GET")[0] == [path]
    reached, sent = call(mod.ApiKeyMiddleware, "/v1/realtime", kind="websocket")
    assert not reached and sent == [{"type": "websocket.close", "code": 1008}]


def test_refuses_to_start_without_a_key(monkeypatch):
    mod = load()
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="VLLM_API_KEY is empty"):
        mod.ApiKeyMiddleware(lambda *a: None)
