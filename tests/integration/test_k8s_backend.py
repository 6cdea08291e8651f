"""The Kubernetes backend against a local HTTP server speaking the REST paths it uses.

No real API server runs here: ``FakeApiServer`` keeps ConfigMaps, JobSets and pods in memory and
answers the official ``kubernetes`` client over HTTP on 127.0.0.1 (kubeconfig pointing at it). The
run store is a real S3-compatible server (moto in server mode).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from gptoss_cloud.backends.base import SubmitOptions, get_backend
from gptoss_cloud.contract.errors import BackendError, GptossError, PlanError
from gptoss_cloud.render.k8s import jobset as rk
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import open_store

RUN = "ft-20250101-120000-abcd"
TOKEN = "sha256~kubeconfig-bearer-token"
SECRET_VALUES = [TOKEN, "moto-secret-key"]

_CORE = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<res>configmaps|pods)(?:/(?P<name>[^/]+))?(?:/(?P<sub>log))?$")
_JS = re.compile(r"^/apis/jobset\.x-k8s\.io/v1alpha2/namespaces/(?P<ns>[^/]+)/jobsets(?:/(?P<name>[^/]+))?$")


def _status(code: int, reason: str, message: str, name: str | None = None, kind: str | None = None) -> dict:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}
    if name:
        body["details"] = {"name": name, "kind": kind}
    return body


class FakeApiServer:
    def __init__(self):
        self.objects: dict[tuple[str, str, str], dict] = {}  # (resource, ns, name)
        self.logs: dict[str, str] = {}
        self.requests: list[tuple[str, str, bytes]] = []
        self.jobset_installed = True
        self.forbid: set[tuple[str, str]] = set()  # (verb, resource)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def _send(self, code, body, ctype="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, verb):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                server.requests.append((verb, self.path, raw))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                code, body, ctype = server.dispatch(verb, self.path, json.loads(raw) if raw else None)
                self._send(code, body, ctype)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PATCH(self):
                self._handle("PATCH")

            def do_DELETE(self):
                self._handle("DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # ---- REST semantics --------------------------------------------------------------------------
    def dispatch(self, verb: str, path: str, body: dict | None):
        u = urlparse(path)
        q = parse_qs(u.query)
        m = _JS.match(u.path)
        if m:
            res = "jobsets"
            if not self.jobset_installed:
                return 404, b"404 page not found\n", "text/plain"
        else:
            m = _CORE.match(u.path)
            if not m:
                return 404, b"404 page not found\n", "text/plain"
            res = m["res"] + ("/log" if m["sub"] else "")
        ns, name = m["ns"], m["name"]
        kverb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch", "DELETE": "delete"}[verb]
        if (kverb, res) in self.forbid:
            return 403, _status(403, "Forbidden", f'{res} is forbidden: User "dev" cannot {kverb} resource "{res}" in API group "" in the namespace "{ns}"'), "application/json"
        key = (res.split("/")[0], ns, name)
        if verb == "POST":
            name = body["metadata"]["name"]
            key = (res, ns, name)
            if key in self.objects:
                return 409, _status(409, "AlreadyExists", f'{res} "{name}" already exists', name, res), "application/json"
            obj = json.loads(json.dumps(body))
            obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), resourceVersion="1")
            self.objects[key] = obj
            return 201, obj, "application/json"
        if res == "pods/log":
            if key not in self.objects:
                return 404, _status(404, "NotFound", f'pods "{name}" not found', name, "pods"), "application/json"
            assert q.get("container") == ["trainer"]
            return 200, self.logs.get(name, "").encode(), "text/plain"
        if name is None:  # list
            sel = q.get("labelSelector", [""])[0]
            want = dict(kv.split("=", 1) for kv in sel.split(",") if kv)
            items = [o for (r, n_, _), o in self.objects.items() if r == res and n_ == ns
                     and all((o["metadata"].get("labels") or {}).get(k) == v for k, v in want.items())]
            return 200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}, "application/json"
        if key not in self.objects:
            return 404, _status(404, "NotFound", f'{res} "{name}" not found', name, res), "application/json"
        if verb == "GET":
            return 200, self.objects[key], "application/json"
        if verb == "PATCH":
            self.objects[key]["metadata"].update(body["metadata"])
            return 200, self.objects[key], "application/json"
        if verb == "DELETE":
            del self.objects[key]
            if res == "jobsets":  # the controller's garbage collection of the run's pods
                for k in [k for k, o in self.objects.items() if k[0] == "pods" and (o["metadata"].get("labels") or {}).get(rk.RUN_LABEL) == name]:
                    del self.objects[k]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}, "application/json"
        raise AssertionError(verb)

    def add_pod(self, ns: str, run_id: str, node: int, phase: str = "Running", restarts: int = 0, log: str = "") -> str:
        name = f"{rk.pod_name_prefix(run_id, node)}-{uuid.uuid4().hex[:5]}"
        self.objects[("pods", ns, name)] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {rk.RUN_LABEL: run_id},
                         "annotations": {rk.COMPLETION_INDEX_ANNOTATION: str(node)},
                         "creationTimestamp": "2025-01-01T12:00:00Z"},
            "spec": {"nodeName": f"gpu-node-{node}", "containers": [{"name": "trainer", "image": "x"}]},
            "status": {"phase": phase, "containerStatuses": [{
                "name": "trainer", "ready": phase == "Running", "restartCount": restarts, "image": "x", "imageID": "",
                "state": {"running": {"startedAt": "2025-01-01T12:01:00Z"}} if phase == "Running" else {"waiting": {"reason": "ContainerCreating"}},
            }]},
        }
        self.logs[name] = log
        return name

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def api(tmp_path, monkeypatch, s3_bucket):
    bucket = s3_bucket[len("s3://"):].split("/", 1)[0]  # a fresh bucket on the session's S3 server
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "moto-secret-key")  # distinctive: no output may contain it
    with FakeApiServer() as server:
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "local", "cluster": {"server": server.url}}],
            "users": [{"name": "dev", "user": {"token": TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "local", "user": "dev", "namespace": "ml"}}],
        }
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(path))
        server.store = f"s3://{bucket}/runs"
        yield server


def _spec(store: str, **cluster) -> RunSpec:
    return RunSpec.model_validate({
        "name": "ft", "model": {"name": "120b"}, "parallelism": {"nodes": 2, "gpus_per_node": 8},
        "output": {"store": store},
        "cluster": {"backend": "k8s", "namespace": "ml", "store_secret": {"name": "s3-creds"}, **cluster},
    })


def _home(api) -> str:
    return f"{api.store}/{RUN}"


def _submit(api, spec=None, **opts):
    spec = spec or _spec(api.store)
    return get_backend("k8s").submit(spec, RUN, _home(api), SubmitOptions(**opts))


# ---- tests ---------------------------------------------------------------------------------------
def test_submit_creates_configmap_then_jobset_and_links_them(api):
    res = _submit(api)
    assert res.run_id == RUN and res.backend == "k8s"
    cm = api.objects[("configmaps", "ml", f"{RUN}-spec")]
    js = api.objects[("jobsets", "ml", RUN)]
    assert cm["metadata"]["ownerReferences"][0]["uid"] == js["metadata"]["uid"]
    assert js["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 2
    posts = [p for v, p, _ in api.requests if v == "POST"]
    assert posts[0].endswith("/configmaps") and posts[1].endswith("/jobsets")
    # The run home holds the resolved spec for status/logs/cancel.
    assert RunSpec.model_validate(yaml.safe_load(open_store(_home(api)).read_bytes("spec.yaml"))) == _spec(api.store)
    for _, _, body in api.requests:
        for secret in SECRET_VALUES:
            assert secret.encode() not in body


def test_dry_run_talks_to_no_server_and_writes_manifests(api, tmp_path):
    res = _submit(api, dry_run=True, out=tmp_path / "out")
    assert api.requests == []
    assert [p.name for p in res.written] == [f"configmap-{RUN}-spec.yaml", f"jobset-{RUN}.yaml"]
    kinds = [o["kind"] for o in yaml.safe_load_all(res.rendered)]
    assert kinds == ["ConfigMap", "JobSet"]
    assert json.loads(_submit(api, dry_run=True, output_format="json").rendered)["kind"] == "List"


def test_submit_refuses_a_plan_that_cannot_fit_unless_forced(api):
    full = _spec(api.store).model_copy(update={"method": RunSpec().method.model_copy(update={"kind": "full"}),
                                                   "optim": RunSpec.model_validate({"optim": {"name": "adamw"}}).optim})
    with pytest.raises(PlanError, match="does not fit"):
        _submit(api, spec=full)
    assert api.requests == []
    _submit(api, spec=full, force=True)
    assert ("jobsets", "ml", RUN) in api.objects


def test_local_store_refused_for_pods(api, tmp_path):
    with pytest.raises(BackendError, match="pods cannot reach"):
        _submit(api, spec=_spec(str(tmp_path / "runs")))


def test_missing_jobset_crd_says_how_to_install(api):
    api.jobset_installed = False
    with pytest.raises(BackendError) as ei:
        _submit(api)
    assert "JobSet API (jobset.x-k8s.io/v1alpha2) is not installed" in ei.value.message
    assert "v0.12.0/manifests.yaml" in ei.value.hint
    # The ConfigMap created first is removed again.
    assert ("configmaps", "ml", f"{RUN}-spec") not in api.objects


def test_forbidden_names_verb_and_resource(api):
    api.forbid.add(("create", "configmaps"))
    with pytest.raises(BackendError) as ei:
        _submit(api)
    assert ei.value.message.startswith("forbidden: cannot create configmaps in namespace 'ml'")
    assert "'create' on 'configmaps'" in ei.value.hint


def test_bad_credentials_and_unreachable_server(api, monkeypatch, tmp_path):
    cfg = yaml.safe_load(open(api_kubeconfig := __import__("os").environ["KUBECONFIG"]).read())
    cfg["users"][0]["user"]["token"] = "wrong"
    bad = tmp_path / "bad"
    bad.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("KUBECONFIG", str(bad))
    with pytest.raises(BackendError, match="rejected the credentials"):
        _submit(api)
    cfg["clusters"][0]["cluster"]["server"] = "http://127.0.0.1:9"  # discard port: nothing listens
    bad.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("KUBECONFIG", str(bad))
    with pytest.raises(BackendError, match="cannot reach the Kubernetes API server"):
        _submit(api)
    assert api_kubeconfig


def test_unknown_context_is_one_clear_line(api):
    with pytest.raises(BackendError, match="context 'prod'"):
        _submit(api, spec=_spec(api.store, context="prod"))


def test_status_combines_jobset_pods_and_metrics(api):
    _submit(api)
    api.add_pod("ml", RUN, 0, restarts=1)
    api.add_pod("ml", RUN, 1, phase="Pending")
    js = api.objects[("jobsets", "ml", RUN)]
    js["status"] = {"restarts": 1, "replicatedJobsStatus": [{"name": "w", "active": 1, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}],
                    "conditions": [{"type": "StartupPolicyCompleted", "status": "True", "reason": "x", "message": "y", "lastTransitionTime": "2025-01-01T12:00:00Z"}]}
    metrics = [{"step": 9, "loss": 2.5, "tokens_per_s": 1000.0, "tokens": 90}, {"step": 10, "loss": 2.25, "tokens_per_s": 1100.0, "tokens": 100}]
    open_store(_home(api)).write_bytes("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics).encode())
    st = get_backend("k8s").status(RUN, _home(api))
    assert st.state == "Running"
    assert st.detail["restarts"] == 1
    assert [(p["node_rank"], p["phase"], p["restarts"]) for p in st.detail["pods"]] == [(0, "Running", 1), (1, "Pending", 0)]
    assert st.detail["pods"][1]["reason"] == "ContainerCreating"
    assert st.detail["metrics"] == {"step": 10, "loss": 2.25, "tokens_per_s": 1100.0, "tokens": 100}
    js["status"]["conditions"].append({"type": "Completed", "status": "True", "reason": "AllJobsCompleted", "message": "done", "lastTransitionTime": "2025-01-01T13:00:00Z"})
    assert get_backend("k8s").status(RUN, _home(api)).state == "Succeeded"


def test_logs_by_node_index(api):
    _submit(api)
    api.add_pod("ml", RUN, 0, log="rank0 step 1\nrank0 step 2\n")
    api.add_pod("ml", RUN, 1, log="rank1 ready\n")
    assert list(get_backend("k8s").logs(RUN, _home(api))) == ["rank0 step 1", "rank0 step 2"]
    assert list(get_backend("k8s").logs(RUN, _home(api), node=1, follow=True)) == ["rank1 ready"]
    assert any("follow=true" in p for v, p, _ in api.requests if "/log" in p)
    with pytest.raises(GptossError, match="out of range"):
        list(get_backend("k8s").logs(RUN, _home(api), node=2))


def test_cancel_deletes_jobset_and_configmap_and_list_runs(api):
    _submit(api)
    open_store(_home(api)).write_bytes("metrics.jsonl", b'{"step": 3, "loss": 4.0, "tokens_per_s": 10.0, "tokens": 30}\n')
    runs = get_backend("k8s").list_runs(_spec(api.store))
    assert [(r.run_id, r.state, r.detail["metrics"]["step"]) for r in runs] == [(RUN, "Pending", 3)]
    get_backend("k8s").cancel(RUN, _home(api))
    assert ("jobsets", "ml", RUN) not in api.objects and ("configmaps", "ml", f"{RUN}-spec") not in api.objects
    deletes = [urlparse(p) for v, p, _ in api.requests if v == "DELETE" and urlparse(p).path.endswith(f"/jobsets/{RUN}")]
    assert deletes and "propagationPolicy=Foreground" in deletes[0].query  # pods go with it
    with pytest.raises(BackendError, match="no JobSet or ConfigMap"):
        get_backend("k8s").cancel(RUN, _home(api))
    st = get_backend("k8s").status(RUN, _home(api))
    assert st.state == "Unknown" and "JobSet not found" in st.detail["note"]
    open_store(_home(api)).write_bytes("merged-mxfp4/model.safetensors.index.json", b"{}")
    assert get_backend("k8s").status(RUN, _home(api)).state == "Succeeded"   # an MXFP4 merge is a finished run too
