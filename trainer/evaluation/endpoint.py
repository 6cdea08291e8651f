"""``eval --endpoint URL``: the same loss and checks, through a vLLM OpenAI-compatible server.

Every request is ``POST <URL>/completions`` with the prompt given as token ids, the exact harmony tokens
the trainer renders (vllm/entrypoints/openai/completion/protocol.py, ``CompletionRequest.prompt``
accepts ``list[int]``; token ids go to the engine as they are, nothing is re-rendered or re-tokenized):

- loss: ``max_tokens: 1`` (vLLM allows 0 only with ``echo``: ``echo_without_generation`` in
  ``to_sampling_params``) and ``prompt_logprobs: 0``, which returns the logprob of each actual prompt
  token and no top-k beside it (``Sampler.gather_logprobs`` in vllm/v1/sample/sampler.py: top-0 plus
  the prompt token; ``_get_prompt_logprobs_dict`` in vllm/v1/worker/gpu_model_runner.py, whose scores are
  ``log_softmax`` in fp32 under the default ``logprobs_mode: raw_logprobs``). The answer's
  ``choices[0].prompt_logprobs`` is one entry per prompt position, ``None`` at position 0, else
  ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` (``CompletionResponseChoice`` and
  ``vllm.logprobs.Logprob``; -inf is sent as -9999.0 by ``clamp_prompt_logprobs``). A request with
  ``prompt_logprobs`` never reads the prefix cache (``SamplingParams.skip_reading_prefix_cache``), so
  every position is computed.
- replies: ``temperature: 0`` (greedy: vLLM then resets top_p/top_k/min_p, ``SamplingParams.__post_init__``),
  neutral penalties, the local generation's stop tokens as ``stop_token_ids``, ``skip_special_tokens:
  false`` and ``return_token_ids: true``, whose ``choices[0].token_ids`` are the generated ids with the
  stop token kept (``Scheduler._update_request_with_output`` trims after it). vLLM also stops at the
  model's other end-of-sequence ids (generation_config.json lists <|endoftext|> too); a reply ended that
  way fails ``ends_with_return`` as it would locally.

The server's answer is untrusted input: its size is bounded before it is parsed, and an answer without
the expected shape is an error naming the URL and what is wrong. Connection failures and 502/503/504 are
retried with backoff for ``retry_s`` seconds (``contract.store.retry.retrying``); redirects are refused,
so the API key is only ever sent to the URL given.
"""

from __future__ import annotations

import http.client
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.store.retry import retrying
from gptoss_cloud.trainer.data.harmony import IGNORE
from gptoss_cloud.trainer.evaluation.evaluate import EvalSequence

REQUEST_TIMEOUT_S = 300.0
DEFAULT_CONCURRENCY = 8   # requests in flight: enough for vLLM to batch, few enough for a shared server
MAX_CONCURRENCY = 64
RETRY_S = 60.0
TRANSIENT_STATUS = frozenset({502, 503, 504})
# Answer size limits: a fixed allowance plus what each prompt or generated token can take (a prompt
# position's entry is ~80 bytes plus its decoded text; a generated token is its id and its text).
BASE_BYTES = 1 << 20
BYTES_PER_PROMPT_TOKEN = 1024
BYTES_PER_NEW_TOKEN = 512
MODELS_BYTES = 1 << 20
MAX_TOKEN_ID = 1 << 24   # far above any vocabulary (harmony: 201,088); a bigger id is not a token


class EndpointError(GptossError):
    """The endpoint could not be reached, refused the request, or answered something unusable."""


def base_url(url: str) -> str:
    """``http(s)://host[:port][/path]/v1``: what ``serve`` prints, with or without its ``/v1``. A URL with
    credentials, a query or a fragment is refused: the key travels in a header and the URL is recorded."""
    p = urllib.parse.urlsplit(url.strip())
    if p.scheme not in ("http", "https") or not p.hostname:
        raise EndpointError(f"--endpoint {url!r}: not an http(s) URL", hint="the endpoint `serve` prints, e.g. http://127.0.0.1:8000/v1")
    if p.username is not None or p.password is not None:
        raise EndpointError("--endpoint: the URL carries credentials; give the key in an environment variable (--api-key-env)")
    if p.query or p.fragment:
        raise EndpointError(f"--endpoint {p.scheme}://{p.netloc}{p.path}: no query or fragment allowed")
    path = p.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return f"{p.scheme}://{p.netloc}{path}"


class _Transient(ConnectionError):
    """A failure worth retrying (``retrying`` retries ConnectionError)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None   # the 3xx surfaces as an HTTPError: the key is never forwarded elsewhere


_OPENER = urllib.request.build_opener(_NoRedirect)


def _clip(text: str, n: int = 300) -> str:
    """Server text fit for one error line: bounded, control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:n]) + ("..." if len(text) > n else "")


def _server_message(body: bytes) -> str:
    """vLLM's ``ErrorResponse`` (``{"error": {"message": ...}}``), else the body's start."""
    try:
        doc = json.loads(body)
        msg = doc["error"]["message"] if isinstance(doc.get("error"), dict) else doc.get("message")
        if isinstance(msg, str):
            return _clip(msg)
    except (ValueError, AttributeError, KeyError, TypeError, RecursionError):
        pass
    return _clip(body.decode("utf-8", "replace"))


@dataclass
class Endpoint:
    url: str                                          # base_url(): what the result records
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None                          # the served model name, from served_model()
    timeout_s: float = REQUEST_TIMEOUT_S
    retry_s: float = RETRY_S
    concurrency: int = DEFAULT_CONCURRENCY            # requests in flight at once (vLLM batches them)

    # ---- transport ------------------------------------------------------------------------------
    def _once(self, path: str, body: dict | None, limit: int) -> bytes:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method="GET" if body is None else "POST")
        try:
            with _OPENER.open(req, timeout=self.timeout_s) as r:
                raw = r.read(limit + 1)
        except urllib.error.HTTPError as e:
            text = _server_message(e.read(64 << 10))
            if e.code in TRANSIENT_STATUS:
                raise _Transient(f"HTTP {e.code}: {text}") from e
            if e.code in (401, 403):
                raise EndpointError(f"{self.url}{path}: HTTP {e.code}, the endpoint refused the API key ({text})",
                                    hint="export the key the server was started with and name its variable with --api-key-env "
                                         "(default VLLM_API_KEY)") from e
            if 300 <= e.code < 400:
                raise EndpointError(f"{self.url}{path}: HTTP {e.code} redirect to {_clip(e.headers.get('Location') or '?')}",
                                    hint="give the final URL as --endpoint") from e
            raise EndpointError(f"{self.url}{path}: HTTP {e.code}: {text}") from e
        except TimeoutError as e:
            raise EndpointError(f"{self.url}{path}: no answer within {self.timeout_s:g} s", hint="--timeout SECONDS waits longer") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise EndpointError(f"{self.url}{path}: no answer within {self.timeout_s:g} s", hint="--timeout SECONDS waits longer") from e
            raise _Transient(str(e.reason)) from e
        except (OSError, http.client.HTTPException) as e:   # reset or cut off mid-answer (raised bare by http.client)
            raise _Transient(f"{type(e).__name__}: {e}") from e
        if len(raw) > limit:
            raise EndpointError(f"{self.url}{path}: the answer is larger than {limit:,} bytes")
        return raw

    def _call(self, path: str, body: dict | None, limit: int) -> Any:
        try:
            raw = retrying(lambda: self._once(path, body, limit), self.retry_s, f"eval endpoint {self.url}{path}")
        except _Transient as e:
            raise EndpointError(f"{self.url}{path}: cannot reach the endpoint ({_clip(str(e))}), still failing "
                                f"{self.retry_s:g} s after the first try",
                                hint="is the server up? `gptoss-cloud serve RUN` prints its endpoint") from e
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise EndpointError(f"{self.url}{path}: the answer is not JSON ({_clip(str(e), 120)})") from e

    # ---- requests -------------------------------------------------------------------------------
    def served_model(self, run_id: str) -> str:
        """The model to ask: the run's id when the server serves it, else the one model it serves."""
        names = parse_models(self._call("/models", None, MODELS_BYTES), self.url)
        if run_id in names:
            return run_id
        if len(names) == 1:
            return names[0]
        raise EndpointError(f"{self.url} serves {', '.join(map(repr, names[:10])) or 'no model'}, not run {run_id}",
                            hint="point --endpoint at the server of this run (gptoss-cloud serve RUN)")

    def _complete(self, body: dict, limit: int) -> dict:
        return self._call("/completions", {"model": self.model, **body}, limit)

    def token_losses(self, seq: EvalSequence) -> list[float]:
        ids = seq.input_ids
        resp = self._complete({"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0,
                               "return_token_ids": True}, BASE_BYTES + BYTES_PER_PROMPT_TOKEN * len(ids))
        logprobs = parse_prompt_logprobs(resp, ids, self.url)
        return [-lp if lab != IGNORE else math.nan for lp, lab in zip(logprobs, seq.labels[1:])]

    def generate(self, prompt: list[int], stop: list[int], max_new_tokens: int) -> list[int]:
        resp = self._complete({
            "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "repetition_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "stop_token_ids": stop, "skip_special_tokens": False,
            "return_token_ids": True,
        }, BASE_BYTES + BYTES_PER_NEW_TOKEN * max_new_tokens)
        return parse_generated(resp, max_new_tokens, self.url)


# ---------------------------------------------------------------------------------------- parsing
def _bad(url: str, what: str) -> EndpointError:
    return EndpointError(f"{url}/completions: unexpected answer: {what}", hint="is --endpoint a vLLM OpenAI server (vLLM >= 0.10)?")


def _choice(resp: Any, url: str) -> dict:
    if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list) or len(resp["choices"]) != 1:
        raise _bad(url, "no single choice in 'choices'")
    (c,) = resp["choices"]
    if not isinstance(c, dict):
        raise _bad(url, "choices[0] is not an object")
    return c


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < MAX_TOKEN_ID


def parse_models(resp: Any, url: str) -> list[str]:
    """``GET /v1/models``: ``{"data": [{"id": NAME, ...}, ...]}``."""
    data = resp.get("data") if isinstance(resp, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise EndpointError(f"{url}/models: unexpected answer: no list of models with ids in 'data'",
                            hint="is --endpoint an OpenAI-compatible server?")
    return [m["id"] for m in data]


def parse_prompt_logprobs(resp: Any, ids: list[int], url: str) -> list[float]:
    """The logprob of each prompt token at positions 1.., checked against the prompt that was sent."""
    c = _choice(resp, url)
    echoed = c.get("prompt_token_ids")
    if echoed is not None and echoed != ids:
        raise _bad(url, "prompt_token_ids differ from the prompt sent")
    plp = c.get("prompt_logprobs")
    if not isinstance(plp, list):
        raise _bad(url, "no 'prompt_logprobs' list (does the server support prompt_logprobs?)")
    if len(plp) != len(ids):
        raise _bad(url, f"{len(plp)} prompt_logprobs entries for a prompt of {len(ids)} tokens")
    if plp[0] is not None:
        raise _bad(url, "prompt_logprobs[0] is not null")
    out = []
    for pos in range(1, len(ids)):
        entry = plp[pos]
        tok = entry.get(str(ids[pos])) if isinstance(entry, dict) else None
        lp = tok.get("logprob") if isinstance(tok, dict) else None
        if not isinstance(lp, (int, float)) or isinstance(lp, bool):
            raise _bad(url, f"prompt_logprobs[{pos}] has no logprob for the prompt's token {ids[pos]}")
        # A log-probability is finite (vLLM clamps -inf to -9999) and at most 0; a positive one means the
        # server returns logits (logprobs_mode raw_logits/processed_logits), not log-probabilities.
        if not math.isfinite(lp) or lp > 1e-4:
            raise _bad(url, f"prompt_logprobs[{pos}] = {lp!r} is not a log-probability (server logprobs_mode must be raw_logprobs)")
        out.append(min(float(lp), 0.0))
    return out


def parse_generated(resp: Any, max_new_tokens: int, url: str) -> list[int]:
    """The reply's token ids (``return_token_ids``), the stop token included."""
    c = _choice(resp, url)
    toks = c.get("token_ids")
    if toks is None:
        raise _bad(url, "no 'token_ids' (the server ignored return_token_ids: vLLM >= 0.10.2 returns them)")
    if not isinstance(toks, list) or not all(_is_id(t) for t in toks):
        raise _bad(url, "'token_ids' is not a list of token ids")
    if len(toks) > max_new_tokens:
        raise _bad(url, f"{len(toks)} tokens generated, more than max_tokens {max_new_tokens}")
    return toks
