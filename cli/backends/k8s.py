"""Kubernetes backend: apply the rendered ConfigMap + JobSet, then status, logs, cancel, list; serve a run
(merge Job + vLLM Deployment + Service + NetworkPolicy ...) and delete its objects.

Rendering is pure (render/k8s/); this module only talks to the API server through kube/. Run
control reads the run's spec from its home in the store, so ``status RUN`` finds the namespace and
context the run was submitted with (GPTOSS_NAMESPACE / GPTOSS_CONTEXT override them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from gptoss_cloud.contract.errors import BackendError, GptossError, StoreError
from gptoss_cloud.contract.merged import published_key
from gptoss_cloud.render.k8s import jobset as rk
from gptoss_cloud.render.k8s.meta import NAME_LABEL, RUN_LABEL
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import is_remote, join, open_store
from gptoss_cloud.backends.base import Backend, Emit, RunStatus, ServeOptions, SubmitOptions, SubmitResult

# Every kind gptoss-cloud creates for a run carries the run-id label (JobSet, ConfigMap, merge Job, serving objects).
RUN_KINDS = ["Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "PodMonitor", "Job", "JobSet",
             "ConfigMap", "Secret"]

CONTAINER = "trainer"


def render_text(objects: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2) + "\n"
    return rk.to_yaml(objects)


def jobset_state(js: dict) -> str:
    """Pending | Running | Succeeded | Failed | Suspended from a JobSet's status conditions."""
    status = js.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if conds.get("Completed") == "True":
        return "Succeeded"
    if conds.get("Failed") == "True":
        return "Failed"
    if conds.get("Suspended") == "True" or (js.get("spec") or {}).get("suspend"):
        return "Suspended"
    for rj in status.get("replicatedJobsStatus") or []:
        if rj.get("active", 0) > 0:
            return "Running"
    return "Pending"


def last_metrics(home: str) -> dict | None:
    """The last step record of the run's metrics.jsonl in the store, if any (event records skipped)."""
    try:
        text = open_store(home).read_bytes("metrics.jsonl").decode("utf-8", "replace")
    except StoreError:
        return None
    for line in reversed(text.strip().splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "event" not in row:
            return row
    return None


def _pod_summary(pod: Any) -> dict:
    ann = pod.metadata.annotations or {}
    statuses = (pod.status.container_statuses or []) if pod.status else []
    restarts = sum(cs.restart_count or 0 for cs in statuses)
    reason = None
    for cs in statuses:
        st = cs.state
        if st and st.waiting and st.waiting.reason:
            reason = st.waiting.reason
        elif st and st.terminated and st.terminated.reason:
            reason = st.terminated.reason
    return {
        "name": pod.metadata.name,
        "node_rank": int(ann.get(rk.COMPLETION_INDEX_ANNOTATION, "-1")),
        "phase": pod.status.phase if pod.status else None,
        "reason": reason,
        "restarts": restarts,
        "node": pod.spec.node_name if pod.spec else None,
    }


def _created(pod: Any) -> tuple[float, str]:
    ts = pod.metadata.creation_timestamp
    return (ts.timestamp() if ts else 0.0, pod.metadata.name)


class KubernetesBackend(Backend):
    name = "k8s"

    # ---- connection ---------------------------------------------------------------------------
    def connect(self, spec: RunSpec):
        from gptoss_cloud.kube.client import connect

        ns = os.environ.get("GPTOSS_NAMESPACE") or spec.cluster.namespace
        ctx = os.environ.get("GPTOSS_CONTEXT") or spec.cluster.context
        return connect(ns, ctx)

    def run_spec(self, home: str) -> RunSpec:
        from gptoss_cloud.contract.runs import read_run_spec

        return read_run_spec(home)

    # ---- submit -------------------------------------------------------------------------------
    def _preflight(self, spec: RunSpec, home: str, opts: SubmitOptions) -> None:
        if not is_remote(spec.output.store):
            raise BackendError(
                f"output.store {spec.output.store!r} is a local folder the pods cannot reach",
                hint="set output.store (or --store / GPTOSS_STORE) to s3://bucket/prefix and cluster.store_secret",
            )

    def _submit(self, spec: RunSpec, run_id: str, home: str, opts: SubmitOptions) -> SubmitResult:
        objects = rk.render_run(spec, run_id)
        text = render_text(objects, opts.output_format)
        result = SubmitResult(run_id=run_id, home=home, backend=self.name, rendered=text,
                              details={"namespace": spec.cluster.namespace, "jobset": run_id,
                                       "master_addr": rk.master_addr(run_id)})
        if opts.out is not None:
            result.written = write_manifests(objects, Path(opts.out), opts.output_format)
        if opts.dry_run:
            return result
        from gptoss_cloud.kube.objects import create_object, delete_configmap, set_owner

        kube = self.connect(spec)
        cm, js = objects
        create_object(kube, cm)
        try:
            created = create_object(kube, js)
        except GptossError:
            try:
                delete_configmap(kube, cm["metadata"]["name"])
            except GptossError:
                pass  # best effort: the JobSet error is the one to report
            raise
        set_owner(kube, cm["metadata"]["name"], created)
        result.details["uid"] = created.get("metadata", {}).get("uid")
        return result

    # ---- status -------------------------------------------------------------------------------
    def _status(self, run_id: str, home: str) -> RunStatus:
        from gptoss_cloud.kube.client import is_not_found
        from gptoss_cloud.kube.objects import get_jobset, list_pods

        spec = self.run_spec(home)
        kube = self.connect(spec)
        detail: dict[str, Any] = {"namespace": kube.namespace, "jobset": run_id}
        try:
            js = get_jobset(kube, run_id)
        except BackendError as e:
            if not is_not_found(e):
                raise
            js = None
        metrics = last_metrics(home)
        if metrics:
            detail["metrics"] = {k: metrics[k] for k in ("step", "loss", "tokens_per_s", "tokens", "eval_loss") if k in metrics}
        if js is None:
            detail["note"] = "JobSet not found: cancelled, or finished and removed after ttlSecondsAfterFinished"
            st = open_store(home)
            done = published_key(st) is not None or st.exists("adapter/adapter_config.json")
            return RunStatus(run_id=run_id, state="Succeeded" if done else "Unknown", backend=self.name, detail=detail)
        state = jobset_state(js)
        st = js.get("status") or {}
        detail["restarts"] = st.get("restarts", 0)
        detail["conditions"] = [
            {k: c.get(k) for k in ("type", "status", "reason", "message")} for c in st.get("conditions") or []
        ]
        pods = sorted((_pod_summary(p) for p in list_pods(kube, f"{RUN_LABEL}={run_id}")), key=lambda p: p["node_rank"])
        detail["pods"] = pods
        if state == "Pending" and any(p["phase"] == "Running" for p in pods):
            state = "Running"
        return RunStatus(run_id=run_id, state=state, backend=self.name, detail=detail)

    # ---- logs ---------------------------------------------------------------------------------
    def _logs(self, run_id: str, home: str, *, follow: bool, node: int | None) -> Iterator[str]:
        from gptoss_cloud.kube.objects import list_pods, pod_log_lines

        spec = self.run_spec(home)
        kube = self.connect(spec)
        node = 0 if node is None else node
        if not 0 <= node < spec.parallelism.nodes:
            raise GptossError(f"--node {node} is out of range: run {run_id} has nodes 0..{spec.parallelism.nodes - 1}")
        pods = [p for p in list_pods(kube, f"{RUN_LABEL}={run_id}")
                if (p.metadata.annotations or {}).get(rk.COMPLETION_INDEX_ANNOTATION) == str(node)]
        if not pods:
            raise BackendError(f"no pod for node {node} of run {run_id} in namespace {kube.namespace!r}",
                               hint=f"`gptoss-cloud status {run_id}` shows whether it is still pending or was removed")
        newest = max(pods, key=_created)  # after a JobSet restart, the newest attempt
        return pod_log_lines(kube, newest.metadata.name, CONTAINER, follow=follow)

    # ---- cancel -------------------------------------------------------------------------------
    def _cancel(self, run_id: str, home: str) -> None:
        from gptoss_cloud.kube.client import is_not_found
        from gptoss_cloud.kube.objects import delete_configmap, delete_jobset

        kube = self.connect(self.run_spec(home))
        gone = 0
        for fn, name in ((delete_jobset, run_id), (delete_configmap, rk.configmap_name(run_id))):
            try:
                fn(kube, name)
            except BackendError as e:
                if not is_not_found(e):
                    raise
                gone += 1
        if gone == 2:
            raise BackendError(f"run {run_id} has no JobSet or ConfigMap in namespace {kube.namespace!r}",
                               hint="it already finished and was cleaned up, or lives in another namespace (--namespace)")

    # ---- list ---------------------------------------------------------------------------------
    def list_runs(self, spec: RunSpec) -> list[RunStatus]:
        """Runs with a JobSet in the spec's namespace (newest first)."""
        from gptoss_cloud.kube.objects import list_jobsets

        kube = self.connect(spec)
        items = list_jobsets(kube, "app.kubernetes.io/managed-by=gptoss-cloud")
        items.sort(key=lambda j: j.get("metadata", {}).get("creationTimestamp") or "", reverse=True)
        out = []
        for j in items:
            run_id = j["metadata"]["name"]
            detail = {"namespace": kube.namespace, "restarts": (j.get("status") or {}).get("restarts", 0),
                      "created": j["metadata"].get("creationTimestamp"),
                      "name": (j["metadata"].get("labels") or {}).get(NAME_LABEL)}
            metrics = last_metrics(join(spec.output.store, run_id))  # progress, when the store is this spec's
            if metrics:
                detail["metrics"] = {k: metrics[k] for k in ("step", "loss", "tokens_per_s", "tokens") if k in metrics}
            out.append(RunStatus(run_id=run_id, state=jobset_state(j), backend=self.name, detail=detail))
        return out


    # ---- serve --------------------------------------------------------------------------------
    def _serve(self, target, opts: ServeOptions, emit: Emit) -> int:
        from gptoss_cloud.render.k8s import serve as rs

        objects = rs.serve_objects(target)
        if not is_remote(target.home):
            emit(f"warning: {target.home} is a local folder; pods in a cluster can read only an s3:// store", err=True)
        if target.needs_merge:
            emit(f"{target.home}/{target.merged_key}/ not published yet: the merge Job runs first; the server waits for it", err=True)
        if opts.out is not None:
            for path in _write_serving(objects, opts.out, opts.output_format):
                emit(f"wrote {path}", err=True)
        elif opts.dry_run:
            emit(_serving_text(objects, opts.output_format), nl=False)
        if not opts.dry_run and opts.out is None:
            for line in self.apply_serving(target, objects):
                emit(line, err=True)
        elif target.spec.serve.api_key and target.spec.serve.api_key_secret is None:
            name, key = rs.api_key_ref(target.spec, target.run_id)
            emit(f"note: the Deployment reads its API key from Secret {name} (key {key}); `serve` without --dry-run creates it, "
                 f"or: kubectl -n {target.namespace} create secret generic {name} --from-literal={key}=$(openssl rand -hex 32)", err=True)
        for line in usage_lines(target, rs.endpoint(target)):
            emit(line, err=True)
        return 0

    def apply_serving(self, target, objects: list[dict]) -> list[str]:
        from gptoss_cloud.kube.client import connect
        from gptoss_cloud.kube.objects import apply, ensure_api_key_secret
        from gptoss_cloud.render.k8s import serve as rs

        if not is_remote(target.home):
            raise GptossError(f"the cluster cannot read the local store {target.home}",
                              hint="train with output.store: s3://bucket/prefix, or serve with --backend local")
        kube = connect(target.namespace, target.spec.cluster.context)
        lines = []
        if target.spec.serve.api_key and target.spec.serve.api_key_secret is None:
            name, key = rs.api_key_ref(target.spec, target.run_id)
            if ensure_api_key_secret(kube, name, key, rs.labels(target.run_id, "serve")):
                lines.append(f"created Secret {name} with a random API key (key {key!r})")
        for obj in objects:
            lines.append(f"{obj['kind']} {obj['metadata']['name']}: {apply(kube, obj)}")
        return lines

    # ---- delete -------------------------------------------------------------------------------
    def describe_delete(self, run_id: str, spec: RunSpec) -> str | None:
        return f"objects labelled {RUN_LABEL}={run_id} in namespace {spec.cluster.namespace}"

    def _delete(self, run_id: str, home: str, spec: RunSpec) -> list[str]:
        from gptoss_cloud.kube.client import connect
        from gptoss_cloud.kube.objects import delete_by_label

        kube = connect(spec.cluster.namespace, spec.cluster.context)
        return [f"deleted {gone}" for gone in delete_by_label(kube, f"{RUN_LABEL}={run_id}", RUN_KINDS)]


def _serving_text(objects: list[dict], fmt: str) -> str:
    import yaml

    if fmt == "json":
        return json.dumps(objects if len(objects) != 1 else objects[0], indent=2, sort_keys=True) + "\n"
    return yaml.safe_dump_all(objects, sort_keys=True, default_flow_style=False)


def _write_serving(objects: list[dict], out: Path, fmt: str = "yaml") -> list[Path]:
    """One file per object, numbered in apply order (the merge Job before the Deployment that waits for it)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, o in enumerate(objects):
        p = out / f"{i:02d}-{o['kind'].lower()}-{o['metadata']['name']}.{'json' if fmt == 'json' else 'yaml'}"
        p.write_text(_serving_text([o], fmt))
        paths.append(p)
    return paths


def usage_lines(t, base_url: str) -> list[str]:
    """How to reach a served run from the user's machine: endpoint, API key, port-forward, a curl."""
    from gptoss_cloud.render.k8s import serve as rs

    out = [f"endpoint: {base_url}"]
    if t.spec.serve.api_key:
        name, key = rs.api_key_ref(t.spec, t.run_id)
        out.append(f"API key:  export VLLM_API_KEY=$(kubectl -n {t.namespace} get secret {name} -o jsonpath='{{.data.{key}}}' | base64 -d)")
        out.append(f"from your machine: kubectl -n {t.namespace} port-forward svc/{rs.deployment_name(t.run_id)} {t.port}:{t.port}")
    out.append(rs.curl_example(base_url, t.run_id, api_key=bool(t.spec.serve.api_key)))
    return out


def write_manifests(objects: list[dict], out: Path, fmt: str = "yaml") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for obj in objects:
        ext = "json" if fmt == "json" else "yaml"
        path = out / f"{obj['kind'].lower()}-{obj['metadata']['name']}.{ext}"
        path.write_text(json.dumps(obj, indent=2) + "\n" if fmt == "json" else rk.to_yaml([obj]))
        written.append(path)
    return written
