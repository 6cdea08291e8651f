"""Push, status, logs and cancel through the real truss client, against a local server speaking the
Baseten training REST paths the client uses, and a real S3-compatible server (moto) for both the
project upload and the run's store. No Baseten API is reached in CI; this pins what we send and parse.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

from gptoss_cloud.backends.base import SubmitOptions, get_backend
from gptoss_cloud.backends.truss import JOB_FILE
from gptoss_cloud.contract.runs import new_run_id, run_home
from gptoss_cloud.contract.spec import load_spec
from gptoss_cloud.contract.store.objects import open_store

API_KEY = "bt_test_key_not_a_real_one"
SECRET_VALUES = ["AKIASTOREKEYVALUE001", "store/secret+value/0000000000000000001", "hf_tokenvalue000001"]
UPLOAD_BUCKET, RUNS_BUCKET = "baseten-uploads", "gptoss-runs"


class FakeBaseten:
    """Just the training endpoints truss_train calls, with the shapes the client reads back."""

    def __init__(self, s3_url: str):
        self.s3_url = s3_url
        self.requests: list[tuple[str, str, dict | None, str]] = []
        self.state = "TRAINING_JOB_CREATED"
        self.created = datetime.now(timezone.utc)
        self.project: dict | None = None
        t0 = int(self.created.timestamp() * 1e9)
        self.logs = [
            {"timestamp": str(t0 + 1_000_000_000), "message": "gptoss-cloud: node 0 of 2\n", "replica": "job-1-0"},
            {"timestamp": str(t0 + 2_000_000_000), "message": "gptoss-cloud: node 1 of 2\n", "replica": "job-1-1"},
        ]

    def job(self) -> dict:
        return {"id": "job-1", "current_status": self.state, "created_at": self.created.isoformat(),
                "training_project": {"id": "proj-1", "name": self.project["name"]}}

    def handle(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        if method == "POST" and path == "/v1/training_projects":
            self.project = body["training_project"]
            return 200, {"training_project": {"id": "proj-1", "name": self.project["name"]}}
        if method == "GET" and path == "/v1/blobs/credentials/train":
            return 200, {"s3_bucket": UPLOAD_BUCKET, "s3_key": "train/project.tgz",
                         "creds": {"aws_access_key_id": "upload", "aws_secret_access_key": "upload",
                                   "endpoint_url": self.s3_url, "region_name": "us-east-1"}}
        if method == "POST" and path == "/v1/training_projects/proj-1/jobs":
            return 200, {"training_job": self.job()}
        if method == "GET" and path == "/v1/training_projects/proj-1/jobs/job-1":
            return 200, {"training_job": self.job(), "training_project": {"id": "proj-1"}}
        if method == "POST" and path == "/v1/training_projects/proj-1/jobs/job-1/logs":
            lo = (body.get("start_epoch_millis") or 0) * 1_000_000
            hi = (body.get("end_epoch_millis") or 2**62 // 1_000_000) * 1_000_000
            logs = [log for log in self.logs if lo <= int(log["timestamp"]) <= hi]
            ordered = logs if body.get("direction") == "asc" else logs[::-1]  # newest first unless asked
            return 200, {"logs": ordered[: body.get("limit")]}
        if method == "POST" and path == "/v1/training_projects/proj-1/jobs/job-1/stop":
            self.state = "TRAINING_JOB_STOPPED"
            return 200, {"training_job": self.job()}
        return 404, {"error": f"no route {method} {path}"}


@pytest.fixture(scope="module")
def s3_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="t", aws_secret_access_key="t", region_name="us-east-1")
    for bucket in (UPLOAD_BUCKET, RUNS_BUCKET):
        s3.create_bucket(Bucket=bucket)
    yield url
    server.stop()


@pytest.fixture
def baseten(s3_url, monkeypatch):
    fake = FakeBaseten(s3_url)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw) if raw else None
            fake.requests.append((method, self.path, body, self.headers.get("Authorization", "")))
            status, payload = fake.handle(method, self.path.split("?")[0], body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    # truss maps an app URL to its REST API through this table; add the local server to it.
    import truss.remote.baseten.api as baseten_api

    monkeypatch.setitem(baseten_api.API_URL_MAPPING, url, url)
    monkeypatch.setenv("BASETEN_API_KEY", API_KEY)
    monkeypatch.setenv("BASETEN_REMOTE_URL", url)
    # The run's store is on the S3 server; these are the store's credentials on this machine.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_VALUES[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUES[1])
    monkeypatch.setenv("HF_TOKEN", SECRET_VALUES[2])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield fake
    server.shutdown()


def test_push_then_follow_the_job(baseten, s3_url, tmp_path):
    spec = load_spec(None, overrides={
        "model.name": "120b", "parallelism.nodes": 2, "output.store": f"s3://{RUNS_BUCKET}/runs",
        "cluster.backend": "truss", "cluster.hf_token_secret": {"name": "hf_access_token"},
    })
    run_id = new_run_id(spec.name)
    home = run_home(spec.output.store, run_id)
    backend = get_backend("truss")

    res = backend.submit(spec, run_id, home, SubmitOptions(out=tmp_path / "project"))
    assert res.details["job_id"] == "job-1" and res.details["project_id"] == "proj-1"
    assert res.details["state"] == "Pending"

    # Every call carried our key; the project and job bodies are what truss_train sends for config.py.
    assert all(auth == f"Api-Key {API_KEY}" for *_, auth in baseten.requests)
    assert baseten.project["name"] == "gptoss"
    (job_body,) = [b for m, p, b, _ in baseten.requests if p == "/v1/training_projects/proj-1/jobs"]
    job = job_body["training_job"]
    assert job["name"] == run_id
    assert job["compute"]["node_count"] == 2
    assert job["compute"]["accelerator"] == {"accelerator": "H100", "count": 8}
    env = job["runtime"]["environment_variables"]
    assert env["GPTOSS_RUN_ID"] == run_id
    assert env["HF_TOKEN"] == {"name": "hf_access_token"}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "aws_secret_access_key"}
    assert job["runtime"]["start_commands"] == ["bash ./run.sh"]
    assert job["runtime"]["artifacts"] == [{"s3_bucket": UPLOAD_BUCKET, "s3_key": "train/project.tgz"}]
    sent = json.dumps([r[2] for r in baseten.requests])
    for value in SECRET_VALUES:
        assert value not in sent, "a secret value left this machine"

    # The uploaded archive is the rendered project.
    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
    archive = s3.get_object(Bucket=UPLOAD_BUCKET, Key="train/project.tgz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
        assert {"config.py", "spec.yaml", "run.sh"} <= names
        for member in tar.getmembers():
            if member.isfile():
                text = tar.extractfile(member).read().decode(errors="replace")
                assert not any(v in text for v in SECRET_VALUES), member.name

    # The run home has the spec and the job record, so the run can be found by its id alone.
    store = open_store(home)
    assert store.exists("spec.yaml")
    assert json.loads(store.read_bytes(JOB_FILE))["job_id"] == "job-1"

    assert backend.status(run_id, home).state == "Pending"
    baseten.state = "TRAINING_JOB_RUNNING"
    st = backend.status(run_id, home)
    assert (st.state, st.detail["baseten_status"], st.backend) == ("Running", "TRAINING_JOB_RUNNING", "truss")

    lines = list(backend.logs(run_id, home))
    assert [line.split("]: ", 1)[1] for line in lines] == ["(job-1-0) gptoss-cloud: node 0 of 2",
                                                         "(job-1-1) gptoss-cloud: node 1 of 2"]
    assert [line.split("]: ", 1)[1] for line in backend.logs(run_id, home, node=1)] == ["(job-1-1) gptoss-cloud: node 1 of 2"]

    # -f follows through truss' own watcher until the job leaves its running states.
    baseten.state = "TRAINING_JOB_COMPLETED"
    followed = [line.split("]: ", 1)[1] for line in backend.logs(run_id, home, follow=True)]
    assert followed == ["(job-1-0) gptoss-cloud: node 0 of 2", "(job-1-1) gptoss-cloud: node 1 of 2"]
    assert backend.status(run_id, home).state == "Succeeded"

    baseten.state = "TRAINING_JOB_RUNNING"
    backend.cancel(run_id, home)
    assert ("POST", "/v1/training_projects/proj-1/jobs/job-1/stop") in [(m, p) for m, p, *_ in baseten.requests]
    assert backend.status(run_id, home).state == "Cancelled"


def test_api_errors_become_one_line(baseten, tmp_path):
    home = tmp_path / "runs" / "r-20260101-000000-abcd"
    home.mkdir(parents=True)
    (home / JOB_FILE).write_text(json.dumps({"project_id": "proj-9", "job_id": "job-9"}))
    from gptoss_cloud.contract.errors import BackendError

    with pytest.raises(BackendError, match=r"^Baseten refused to read training job job-9 of run r-20260101-000000-abcd: ") as e:
        get_backend("truss").status("r-20260101-000000-abcd", str(home))
    assert "\n" not in e.value.message
