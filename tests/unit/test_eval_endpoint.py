"""`eval --endpoint`: what an answer from the server must look like, and what happens when it does not.

The correct answers come from the real vLLM server (tests/integration/test_vllm_serve.py); a tiny
local HTTP stub here stands in only for servers that misbehave: malformed or oversized answers,
refused keys, redirects, transient failures and no server at all.
"""

from __future__ import annotations

import http.server
import json
import math
import threading
import time

import pytest
from support import free_port
from typer.testing import CliRunner

from gptoss_cloud.trainer.evaluation.endpoint import (Endpoint, EndpointError, base_url, parse_generated, parse_models,
                                                      parse_prompt_logprobs)
from gptoss_cloud.trainer.evaluation.evaluate import EvalSequence

URL = "http://127.0.0.1:9/v1"
IDS = [200006, 17360, 200008, 1008]


def prompt_answer(ids, logprobs, **extra) -> dict:
    """What vLLM answers (CompletionResponseChoice): position 0 null, then {"<id>": Logprob} per token."""
    plp = [None] + [{str(t): {"logprob": lp, "rank": 1, "decoded_token": "x"}} for t, lp in zip(ids[1:], logprobs)]
    return {"choices": [{"index": 0, "text": "", "prompt_logprobs": plp, "prompt_token_ids": ids, **extra}]}


# ---------------------------------------------------------------------------------------- the URL
@pytest.mark.parametrize("given,want", [
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"), ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
    ("https://h.example/proxy/v1/", "https://h.example/proxy/v1"), ("http://h:1/", "http://h:1/v1"),
])
def test_the_endpoint_is_the_url_serve_prints_with_or_without_v1(given, want):
    assert base_url(given) == want


@pytest.mark.parametrize("bad,says", [
    ("ftp://h/v1", "not an http(s) URL"), ("127.0.0.1:8000", "not an http(s) URL"),
    ("http://me:s3cret@h/v1", "carries credentials"), ("http://h/v1?api_key=s3cret", "no query"),
])
def test_a_url_with_credentials_or_no_scheme_is_refused(bad, says):
    with pytest.raises(EndpointError) as e:
        base_url(bad)
    assert says in str(e.value) and "s3cret" not in str(e.value)


# ------------------------------------------------------------------------------------- the answers
def test_prompt_logprobs_give_each_tokens_logprob():
    assert parse_prompt_logprobs(prompt_answer(IDS, [-1.5, -9999.0, 0.0]), IDS, URL) == [-1.5, -9999.0, 0.0]


def test_losses_are_the_negated_logprobs_of_the_trained_tokens_only():
    seq = EvalSequence(0, "low", IDS, [-100, -100, 200008, 1008], [None, None, "final", "final"])

    class Stub(Endpoint):
        def _call(self, path, body, limit):
            assert path == "/completions" and body["prompt"] == IDS and body["prompt_logprobs"] == 0 and body["max_tokens"] == 1
            return prompt_answer(IDS, [-3.0, -0.25, -0.5])

    losses = Stub(URL).token_losses(seq)
    assert math.isnan(losses[0]) and losses[1:] == [0.25, 0.5]


@pytest.mark.parametrize("mutate,says", [
    (lambda r: r.update(choices=[]), "no single choice"),
    (lambda r: r["choices"][0].pop("prompt_logprobs"), "no 'prompt_logprobs' list"),
    (lambda r: r["choices"][0]["prompt_logprobs"].pop(), "3 prompt_logprobs entries for a prompt of 4 tokens"),
    (lambda r: r["choices"][0]["prompt_logprobs"].__setitem__(0, {}), "prompt_logprobs[0] is not null"),
    (lambda r: r["choices"][0]["prompt_logprobs"].__setitem__(2, {"5": {"logprob": -1.0}}), "prompt_logprobs[2] has no logprob for the prompt's token 200008"),
    (lambda r: r["choices"][0]["prompt_logprobs"][3]["1008"].update(logprob="-1"), "prompt_logprobs[3] has no logprob"),
    (lambda r: r["choices"][0]["prompt_logprobs"][3]["1008"].update(logprob=4.2), "4.2 is not a log-probability"),
    (lambda r: r["choices"][0]["prompt_logprobs"][1]["17360"].update(logprob=float("nan")), "is not a log-probability"),
    (lambda r: r["choices"][0].update(prompt_token_ids=IDS[::-1]), "prompt_token_ids differ from the prompt sent"),
])
def test_a_malformed_prompt_logprobs_answer_is_an_error_saying_what(mutate, says):
    resp = prompt_answer(IDS, [-1.0, -2.0, -3.0])
    mutate(resp)
    with pytest.raises(EndpointError) as e:
        parse_prompt_logprobs(resp, IDS, URL)
    assert says in e.value.message and e.value.message.startswith(f"{URL}/completions: unexpected answer")


def test_generated_token_ids_come_back_with_their_stop_token():
    assert parse_generated({"choices": [{"text": "", "token_ids": [1, 2, 200002]}]}, 3, URL) == [1, 2, 200002]


@pytest.mark.parametrize("choice,says", [
    ({"text": "hi"}, "no 'token_ids'"), ({"token_ids": [1, "2"]}, "not a list of token ids"),
    ({"token_ids": [1, True]}, "not a list of token ids"), ({"token_ids": [-1]}, "not a list of token ids"),
    ({"token_ids": [1, 2, 3, 4]}, "4 tokens generated, more than max_tokens 3"), ({"token_ids": {"a": 1}}, "not a list"),
])
def test_a_malformed_reply_is_an_error(choice, says):
    with pytest.raises(EndpointError) as e:
        parse_generated({"choices": [choice]}, 3, URL)
    assert says in e.value.message


def test_models_and_a_server_that_serves_another_run():
    assert parse_models({"object": "list", "data": [{"id": "a"}, {"id": "b"}]}, URL) == ["a", "b"]
    with pytest.raises(EndpointError, match="no list of models"):
        parse_models({"data": [{"name": "a"}]}, URL)

    class Two(Endpoint):
        def _call(self, path, body, limit):
            return {"data": [{"id": "other-run"}, {"id": "third"}]}

    assert Two(URL).served_model("third") == "third"
    with pytest.raises(EndpointError, match="serves 'other-run', 'third', not run mine"):
        Two(URL).served_model("mine")


# ------------------------------------------------------------------------------- a misbehaving server
class Stub(http.server.BaseHTTPRequestHandler):
    script: list = []        # (status, headers, body) answered in turn, the last one repeated
    seen: list = []

    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        Stub.seen.append((self.command, self.path, self.headers.get("Authorization"), self.rfile.read(n)))
        status, headers, body = Stub.script[min(len(Stub.seen), len(Stub.script)) - 1]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    Stub.script, Stub.seen = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def ok(doc) -> tuple:
    return 200, {"Content-Type": "application/json"}, json.dumps(doc).encode()


def test_the_key_goes_in_a_header_and_a_refused_key_says_so(stub):
    _, url = stub
    Stub.script = [(401, {}, b'{"error": {"message": "Unauthorized", "type": "Unauthorized", "code": 401}}')]
    with pytest.raises(EndpointError) as e:
        Endpoint(url, api_key="k-123").served_model("r")
    assert f"{url}/models: HTTP 401, the endpoint refused the API key (Unauthorized)" in e.value.message
    assert "k-123" not in str(e.value) and "k-123" not in repr(Endpoint(url, api_key="k-123"))
    assert Stub.seen == [("GET", "/v1/models", "Bearer k-123", b"")]


def test_transient_failures_are_retried_then_the_answer_is_used(stub):
    _, url = stub
    Stub.script = [(503, {}, b"warming up"), (502, {}, b"bad gateway"), ok({"data": [{"id": "r"}]})]
    assert Endpoint(url, retry_s=30).served_model("r") == "r"
    assert len(Stub.seen) == 3


@pytest.mark.parametrize("answer,says", [
    ((200, {}, b"<html>not json</html>"), "the answer is not JSON"),
    ((200, {}, b"[" * 100_000 + b"]" * 100_000), "the answer is larger than"),
    ((400, {}, b'{"error": {"message": "Input length (9000) exceeds model\'s maximum context length (4096).\\u0007"}}'),
     "HTTP 400: Input length (9000) exceeds model's maximum context length (4096).\\x07"),
    ((500, {}, b"x" * 5000), "HTTP 500: " + "x" * 300 + "..."),
    ((307, {"Location": "http://elsewhere.example/v1/models"}, b""), "HTTP 307 redirect to http://elsewhere.example/v1/models"),
])
def test_a_bad_answer_is_one_clear_error_naming_the_url(stub, answer, says, monkeypatch):
    _, url = stub
    monkeypatch.setattr("gptoss_cloud.trainer.evaluation.endpoint.MODELS_BYTES", 150_000)
    Stub.script = [answer]
    with pytest.raises(EndpointError) as e:
        Endpoint(url, api_key="k").served_model("r")
    assert e.value.message.startswith(f"{url}/models: ") and says in e.value.message
    assert len(Stub.seen) == 1   # not transient: asked once, and a redirect is never followed with the key


def test_no_server_is_retried_for_the_budget_then_named():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointError) as e:
        Endpoint(url, retry_s=1.0).served_model("r")
    assert e.value.message.startswith(f"{url}/models: cannot reach the endpoint (") and "still failing 1 s after the first try" in e.value.message


def test_no_answer_within_the_timeout_is_not_retried(stub):
    server, url = stub
    hold = threading.Event()

    class Slow(Stub):
        def _answer(self):
            Stub.seen.append(self.path)
            hold.wait(10)

        do_GET = do_POST = _answer

    server.RequestHandlerClass = Slow
    try:
        with pytest.raises(EndpointError, match=r"/v1/models: no answer within 0.5 s"):
            Endpoint(url, timeout_s=0.5, retry_s=30).served_model("r")
    finally:
        hold.set()
    assert len(Stub.seen) == 1


# -------------------------------------------------------------------------------------- the command
@pytest.mark.parametrize("args,says", [
    (["--endpoint", URL, "--checkpoint", "3"], "--checkpoint and --endpoint"),
    (["--api-key-env", "SOME_KEY"], "apply to an --endpoint"),
    (["--concurrency", "4"], "apply to an --endpoint"),
    (["--endpoint", URL, "--api-key-env", "GPTOSS_TEST_UNSET_KEY"], "--api-key-env GPTOSS_TEST_UNSET_KEY: the variable is not set or empty"),
])
def test_the_command_refuses_flags_that_do_not_go_together(tmp_path, monkeypatch, args, says):
    from gptoss_cloud.contract.spec import RunSpec
    from gptoss_cloud.main import app

    monkeypatch.delenv("GPTOSS_TEST_UNSET_KEY", raising=False)
    home = tmp_path / "r-20261202-060000-abcd"
    home.mkdir()
    (home / "spec.yaml").write_text(RunSpec().to_yaml())
    r = CliRunner().invoke(app, ["eval", str(home), "--data", str(tmp_path / "held.jsonl"), *args])
    assert r.exit_code != 0 and says in str(r.exception)


# ------------------------------------------------------------------------------------ concurrency
class _Slow:
    """A scorer whose calls take a while and report how many ran at once."""

    def __init__(self, concurrency: int, fail_at: int | None = None):
        self.concurrency, self.fail_at = concurrency, fail_at
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def call(self, x: int) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.02 * (1 + (7 * x) % 3))   # finish out of order
        with self.lock:
            self.now -= 1
        if x == self.fail_at:
            raise EndpointError(f"item {x} failed")
        return x * x


def test_calls_overlap_up_to_the_concurrency_and_results_keep_their_order():
    from gptoss_cloud.trainer.evaluation.evaluate import each

    items = list(range(12))
    serial, parallel = _Slow(1), _Slow(4)
    assert each(serial, serial.call, items) == each(parallel, parallel.call, items) == [x * x for x in items]
    assert serial.most == 1 and 1 < parallel.most <= 4


def test_a_failing_call_is_raised():
    from gptoss_cloud.trainer.evaluation.evaluate import each

    scorer = _Slow(4, fail_at=5)
    with pytest.raises(EndpointError, match="item 5 failed"):
        each(scorer, scorer.call, list(range(8)))
