"""An API key on every route of vLLM's OpenAI server, loaded with ``--middleware gptoss_serve_auth.ApiKeyMiddleware``.

vLLM's own ``--api-key`` check (``AuthenticationMiddleware`` in vllm/entrypoints/openai/server_utils.py
of vllm 0.32) guards only paths under ``/v1``, ``/v2`` and ``/inference``: ``/invocations`` runs full
inference and ``/tokenize``, ``/detokenize``, ``/pooling``, ``/score`` ... answer without a key. This
middleware inverts the rule: every HTTP and websocket request needs ``Authorization: Bearer <key>``
except the few paths in ``OPEN_PATHS``, which run no model.

Standalone on purpose (standard library only): it is copied into the serve image and put on the
vLLM process's ``PYTHONPATH`` locally, where the gptoss_cloud package is not installed.
"""

from __future__ import annotations

import hmac
import json
import os

KEY_ENV = "VLLM_API_KEY"
# Liveness/readiness probes and Prometheus scrapes carry no key; neither path runs the model.
OPEN_PATHS = ("/health", "/metrics")


class ApiKeyMiddleware:
    """Pure ASGI middleware (vLLM adds a class given to --middleware with ``app.add_middleware``)."""

    def __init__(self, app, key: str | None = None) -> None:
        self.app = app
        key = key if key is not None else os.environ.get(KEY_ENV, "")
        if not key:
            # Fail closed: a server that was asked to require a key must not start without one.
            raise RuntimeError(f"gptoss_serve_auth: {KEY_ENV} is empty; refusing to serve without an API key")
        self._expected = f"Bearer {key}".encode()

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False

    async def __call__(self, scope, receive, send):
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)   # lifespan
        path = scope.get("path") or ""
        # CORS preflight carries no credentials by design and runs nothing (as vLLM's own check).
        if path in OPEN_PATHS or (kind == "http" and scope.get("method") == "OPTIONS") or self._authorized(scope):
            return await self.app(scope, receive, send)
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": {"message": "Unauthorized: send Authorization: Bearer <API key>",
                                     "type": "authentication_error", "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
