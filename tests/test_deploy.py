"""The KubeRay manifests in deploy/ (a RayJob that fine-tunes, a RayService that serves) and
the image they run (deploy/Dockerfile), checked against KubeRay's API and against raylens.
Pure: no Ray, no Kubernetes; YAML, raylens' own config loaders and Ray Serve's schema.

KubeRay's rules, read in ray-project/kuberay (ray.io/v1, operator v1.5-v1.7):
- ray-operator/apis/ray/v1/raycluster_types.go: RayClusterSpec.headGroupSpec (required);
  HeadGroupSpec.template and rayStartParams (``map[string]string``: values are strings);
  WorkerGroupSpec.groupName, minReplicas, maxReplicas, rayStartParams, template (json tags
  without omitempty), replicas optional; AuthOptions{mode: disabled|token, secretName,
  enableK8sTokenAuth} on RayClusterSpec.authOptions.
- ray-operator/apis/ray/v1/rayjob_types.go: RayJobSpec.entrypoint, rayClusterSpec (or
  clusterSelector), submissionMode (K8sJobMode default), shutdownAfterJobFinishes,
  ttlSecondsAfterFinished, backoffLimit, activeDeadlineSeconds.
- ray-operator/apis/ray/v1/rayservice_types.go: RayServiceSpec.serveConfigV2 is a *string*
  (a YAML document inside the manifest), rayClusterConfig a RayClusterSpec.
- ray-operator/controllers/ray/utils/validation.go: ValidateRayClusterSpec (at least one
  container in head and each worker group; rayStartParams['labels'] refused; authOptions
  token needs rayVersion >= 2.52.0; autoscaler v2 (Ray >= 2.47) needs restartPolicy Never or
  unset), ValidateRayJobSpec (RayClusterSpec or ClusterSelector; TTL only with
  shutdownAfterJobFinishes; activeDeadlineSeconds > 0; backoffLimit >= 0),
  Validate{RayJob,RayService}Metadata (a DNS-1035 name of at most MaxRayClusterNameLength - 6
  = 47 characters, constant.go).
- KubeRay reads a container's GPUs from ``nvidia.com/gpu`` in its resource limits (and passes
  them to ``ray start --num-gpus``); the container at index 0 is the Ray container.
"""

from __future__ import annotations

import ast
import copy
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.serve.schema import ServeDeploySchema
from raylens.cli import parse_job_args
from raylens.config import ConfigError
from raylens.serving.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RAYJOB = DEPLOY / "rayjob-finetune.yaml"
RAYSERVICE = DEPLOY / "rayservice-serve.yaml"
MANIFESTS = [RAYJOB, RAYSERVICE]
DOCKERFILE = DEPLOY / "Dockerfile"

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 53 - 6  # MaxRayClusterNameLength - len of the generated cluster-name suffix
GPU = "nvidia.com/gpu"
OBJECT_STORE_SECRET = "raylens-object-store"
# What the RayService's serveConfigV2 changes from serve/config.yaml, on purpose (the
# manifest's header says why); anything else that differs is drift.
DELIBERATE = {
    "http_options.host",  # 0.0.0.0: reachable from the Kubernetes Service
    "applications[raylens].args.models[fashion-mnist-vgg].run",  # s3://, not local runs/
    "applications[raylens].deployments[ModelServer].autoscaling_config.max_replicas",
    "applications[raylens].deployments[ModelServer].ray_actor_options.num_cpus",
    "applications[raylens].deployments[ModelServer].ray_actor_options.num_gpus",
}


def load_manifest(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one object per file"
    return docs[0]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def pod_specs(spec: dict) -> Iterator[tuple[str, dict]]:
    """(group, pod spec) for the head and each worker group of a RayClusterSpec."""
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]["spec"]


def ray_containers(doc: dict) -> Iterator[tuple[str, dict]]:
    for group, pod in pod_specs(cluster_spec(doc)):
        yield group, pod["containers"][0]


def quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity ("6", 6, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gpus(container: dict) -> float:
    return quantity(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def kuberay_problems(doc: dict) -> list[str]:
    """What KubeRay's CRDs and validation.go would refuse (see the module docstring)."""
    p: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1":
        p.append(f"apiVersion {doc.get('apiVersion')!r}: expected ray.io/v1")
    kind = doc.get("kind")
    if kind not in ("RayJob", "RayService"):
        return p + [f"kind {kind!r}"]
    name = doc.get("metadata", {}).get("name", "")
    if not DNS1035.match(name) or len(name) > MAX_NAME:
        p.append(f"metadata.name {name!r}: a DNS-1035 label of at most {MAX_NAME} characters")
    spec = doc.get("spec", {})
    if kind == "RayJob":
        if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
            p.append("spec.entrypoint: the command to run is required")
        if spec.get("submissionMode", "K8sJobMode") not in (
            "K8sJobMode",
            "HTTPMode",
            "InteractiveMode",
            "SidecarMode",
        ):
            p.append(f"spec.submissionMode {spec['submissionMode']!r}")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            p.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
        if spec.get("activeDeadlineSeconds", 1) <= 0:
            p.append("activeDeadlineSeconds must be > 0")
        if spec.get("backoffLimit", 0) < 0:
            p.append("backoffLimit must be >= 0")
        if not isinstance(spec.get("rayClusterSpec"), dict):
            return p + ["spec.rayClusterSpec: this job creates its cluster, it is required"]
    else:
        if not isinstance(spec.get("serveConfigV2"), str):
            p.append("spec.serveConfigV2 must be a YAML string (a `|` block), not a mapping")
        elif not isinstance(yaml.safe_load(spec["serveConfigV2"]), dict):
            p.append("spec.serveConfigV2 does not parse to a Serve config")
        if not isinstance(spec.get("rayClusterConfig"), dict):
            return p + ["spec.rayClusterConfig is required"]
        if spec["rayClusterConfig"].get("headGroupSpec", {}).get("headService", {}).get("name"):
            p.append("headService.metadata.name must not be set on a RayService")
    return p + cluster_problems(cluster_spec(doc))


def cluster_problems(spec: dict) -> list[str]:
    p: list[str] = []
    if not isinstance(spec.get("headGroupSpec"), dict):
        return ["headGroupSpec is required"]
    auth = spec.get("authOptions")
    if auth is not None:
        if auth.get("mode", "token") not in ("token", "disabled"):
            p.append(f"authOptions.mode {auth.get('mode')!r}")
        if auth.get("mode", "token") == "token":
            version = spec.get("rayVersion")
            if not isinstance(version, str) or Version(version) < Version("2.52.0"):
                p.append(
                    f"authOptions token needs rayVersion >= 2.52.0 (a string), got {version!r}"
                )
    groups = [("head", spec["headGroupSpec"])] + [
        (g.get("groupName") or "<unnamed>", g) for g in spec.get("workerGroupSpecs", [])
    ]
    names = [n for n, _ in groups[1:]]
    if len(set(names)) != len(names) or "<unnamed>" in names:
        p.append(f"worker groupName missing or repeated: {names}")
    for name, g in groups:
        params = g.get("rayStartParams")
        if not isinstance(params, dict):
            p.append(f"{name}: rayStartParams is required (may be {{}})")
        else:
            bad = {k: v for k, v in params.items() if not isinstance(v, str)}
            if bad:
                p.append(f"{name}: rayStartParams values must be strings: {bad}")
            if "labels" in params:
                p.append(f"{name}: rayStartParams['labels'] is refused, use the group's labels")
        pod = g.get("template", {}).get("spec", {})
        containers = pod.get("containers") or []
        if not containers:
            p.append(f"{name}: template.spec.containers needs at least one container")
        for c in containers:
            if not c.get("name") or not c.get("image"):
                p.append(f"{name}: every container needs a name and an image")
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
            if GPU in req and req[GPU] != lim.get(GPU):
                p.append(f"{name}: {GPU} belongs in limits (requests, if set, must equal them)")
        if pod.get("restartPolicy") not in (None, "Never"):
            p.append(f"{name}: restartPolicy must be Never or unset (autoscaler v2)")
        if name != "head":
            counts = {k: g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")}
            if not all(isinstance(v, int) and v >= 0 for v in counts.values()):
                p.append(f"{name}: minReplicas, replicas, maxReplicas must be integers >= 0")
            elif not counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]:
                p.append(f"{name}: expected minReplicas <= replicas <= maxReplicas, {counts}")
    return p


def dockerfile() -> list[tuple[str, list[str]]]:
    """deploy/Dockerfile's instructions: (INSTRUCTION, its words), continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines()]
    return [(ln.split()[0].upper(), shlex.split(ln)[1:]) for ln in lines if ln and ln[0] != "#"]


def dockerfile_get(op: str) -> list[list[str]]:
    return [words for o, words in dockerfile() if o == op]


def documented_image() -> str:
    """The image name deploy/Dockerfile's header says to build (one name)."""
    built = set(
        re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    )
    assert len(built) == 1, f"deploy/Dockerfile documents {len(built)} image names: {built}"
    return built.pop()


def dockerfile_env() -> dict[str, str]:
    return dict(w.split("=", 1) for words in dockerfile_get("ENV") for w in words)


def differences(a, b, path: str = "") -> set[str]:
    """Paths where two parsed YAML trees differ; list items keyed by their name/id if any."""

    def keyed(items: list) -> dict | None:
        keys = [i.get("name", i.get("id")) if isinstance(i, dict) else None for i in items]
        return dict(zip(keys, items, strict=True)) if None not in keys else None

    if isinstance(a, dict) and isinstance(b, dict):
        return {
            d
            for k in a.keys() | b.keys()
            for d in differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        }
    if isinstance(a, list) and isinstance(b, list):
        ka, kb = keyed(a), keyed(b)
        if ka is not None and kb is not None:
            return {
                d
                for k in ka.keys() | kb.keys()
                for d in differences(ka.get(k), kb.get(k), f"{path}[{k}]")
            }
        if len(a) == len(b):
            return {
                d
                for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]")
            }
    return set() if a == b else {path}


# --- tests --------------------------------------------------------------------------------


def test_the_deploy_files_are_here():
    for path in (*MANIFESTS, DOCKERFILE):
        assert path.is_file(), path


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_accepts_the_manifest(path):
    doc = load_manifest(path)
    assert kuberay_problems(doc) == []
    assert doc["kind"] == {RAYJOB: "RayJob", RAYSERVICE: "RayService"}[path]


BROKEN: dict[str, tuple[Callable[[dict], None], str]] = {
    "old apiVersion": (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    "name not DNS-1035": (lambda d: d["metadata"].update(name="Raylens_Job"), "metadata.name"),
    "name too long": (lambda d: d["metadata"].update(name="r" * 48), "metadata.name"),
    "rayStartParams number": (
        lambda d: cluster_spec(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "must be strings",
    ),
    "no rayStartParams": (
        lambda d: cluster_spec(d)["workerGroupSpecs"][0].pop("rayStartParams"),
        "rayStartParams is required",
    ),
    "no groupName": (
        lambda d: cluster_spec(d)["workerGroupSpecs"][0].pop("groupName"),
        "groupName",
    ),
    "replicas above max": (
        lambda d: cluster_spec(d)["workerGroupSpecs"][0].update(replicas=9, maxReplicas=4),
        "minReplicas <= replicas",
    ),
    "no containers": (
        lambda d: cluster_spec(d)["workerGroupSpecs"][0]["template"]["spec"].update(containers=[]),
        "at least one container",
    ),
    "GPU in requests only": (
        lambda d: cluster_spec(d)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "resources"
        ]["limits"].pop(GPU),
        "belongs in limits",
    ),
    "auth without rayVersion": (lambda d: cluster_spec(d).pop("rayVersion"), "rayVersion"),
    "restartPolicy Always": (
        lambda d: cluster_spec(d)["headGroupSpec"]["template"]["spec"].update(
            restartPolicy="Always"
        ),
        "restartPolicy",
    ),
}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
@pytest.mark.parametrize("broken", BROKEN, ids=str)
def test_kuberay_checks_reject_a_broken_copy(path, broken):
    """The checks above can fail: broken copies of each manifest are refused, with the field."""
    doc = load_manifest(path)
    mutate, expect = BROKEN[broken]
    mutate(doc)
    problems = kuberay_problems(doc)
    assert any(expect in p for p in problems), problems


def test_kind_specific_fields_are_required():
    job, service = load_manifest(RAYJOB), load_manifest(RAYSERVICE)
    no_entrypoint = copy.deepcopy(job)
    no_entrypoint["spec"].pop("entrypoint")
    assert any("entrypoint" in p for p in kuberay_problems(no_entrypoint))
    no_cluster = copy.deepcopy(job)
    no_cluster["spec"].pop("rayClusterSpec")
    assert any("rayClusterSpec" in p for p in kuberay_problems(no_cluster))
    mapping = copy.deepcopy(service)
    mapping["spec"]["serveConfigV2"] = yaml.safe_load(mapping["spec"]["serveConfigV2"])
    assert any("YAML string" in p for p in kuberay_problems(mapping))


def test_head_gpu_and_cpu_groups():
    """Head: drivers only (num-cpus 0, no GPU). RayJob: a GPU group and a CPU-only group for
    Ray Data; RayService: a GPU group. GPUs as nvidia.com/gpu limits, tolerated GPU taints."""
    for path in MANIFESTS:
        doc = load_manifest(path)
        spec = cluster_spec(doc)
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", path.name
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        containers = dict(ray_containers(doc))
        assert gpus(containers["head"]) == 0, path.name
        assert gpus(containers["gpu"]) >= 1, path.name
        tolerations = groups["gpu"]["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == GPU for t in tolerations), path.name
    job = load_manifest(RAYJOB)
    cpu = dict(ray_containers(job))["cpu"]
    assert gpus(cpu) == 0 and quantity(cpu["resources"]["limits"]["cpu"]) > 0
    (group,) = [g for g in cluster_spec(job)["workerGroupSpecs"] if g["groupName"] == "cpu"]
    assert group["rayStartParams"].get("num-gpus") == "0"


def test_token_auth_on():
    """KubeRay's authOptions (>= 1.5.1) turns Ray token auth on for every container; nothing
    turns it off."""
    for path in MANIFESTS:
        spec = cluster_spec(load_manifest(path))
        assert spec["authOptions"] == {"mode": "token"}, path.name
        assert "RAY_AUTH_MODE=disabled" not in path.read_text()
        assert not re.search(r"name:\s*RAY_AUTH_MODE\s*\n\s*value:\s*\"?disabled", path.read_text())


def test_credentials_only_from_secrets():
    """Object-store credentials reach every Ray container from one Secret (envFrom); no key,
    token or password is written in a manifest."""
    secretish = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|API_KEY)", re.I)
    for path in MANIFESTS:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path.name
        for group, c in ray_containers(load_manifest(path)):
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert OBJECT_STORE_SECRET in refs, (path.name, group)
            for env in c.get("env", []):
                assert not (secretish.search(env["name"]) and "value" in env), (path.name, env)


def test_one_image_with_the_pinned_ray():
    """Both manifests run the one image deploy/Dockerfile builds, FROM Ray's image of the Ray
    pyproject.toml pins (and this venv runs), with the cluster launcher's Python."""
    ((base,),) = dockerfile_get("FROM")
    built, env = documented_image(), dockerfile_env()
    images = {c["image"] for p in MANIFESTS for _, c in ray_containers(load_manifest(p))}
    images |= {
        c["image"]
        for p in MANIFESTS
        for _, pod in pod_specs(cluster_spec(load_manifest(p)))
        for c in pod["containers"]
    }
    assert images == {built}
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert m, f"FROM {base}: expected rayproject/ray:<version>-py<XY>-gpu"
    ray_version, python = m.group(1), f"{m.group(2)}.{m.group(3)}"
    assert ray_version == ray.__version__
    text = (REPO / "pyproject.toml").read_text()
    (pin,) = [Requirement(d) for d in re.findall(r'"(ray\[[^"]+)"', text)]
    assert str(pin.specifier) == f"=={ray_version}"
    assert f"ray{ray_version}" in built and f"py{m.group(2)}{m.group(3)}" in built
    for path in MANIFESTS:
        assert cluster_spec(load_manifest(path))["rayVersion"] == ray_version, path.name
    for cluster in ("cluster.yaml", "cluster.gcp.yaml"):  # the VM clusters' venv
        assert f"--python {python} " in (REPO / cluster).read_text(), cluster
    assert env["PYTHONPATH"].split(":")[0] == "/home/ray/raylens"


def test_the_image_holds_the_repo():
    """deploy/Dockerfile installs the package (pyproject's deps) and ships what the manifests
    run: jobs/ with its configs, serve/, tune_spaces/, in the working dir on PYTHONPATH."""
    ((workdir,),) = dockerfile_get("WORKDIR")
    copies = [[w for w in words if not w.startswith("--")] for words in dockerfile_get("COPY")]
    copied = {src for *srcs, _dst in copies for src in srcs}
    for part in ("pyproject.toml", "README.md", "platform", "jobs", "serve", "tune_spaces"):
        assert part in copied, part
        assert (REPO / part).exists(), part
    for *srcs, dst in copies:  # everything lands in the working dir
        assert dst in ("./", *(f"./{s}" for s in srcs)), (srcs, dst)
    (install,) = [w for w in dockerfile_get("RUN") if w[:2] == ["pip", "install"]]
    assert install[-2:] == ["-e", "."] or install[install.index("-e") + 1] == ".", install
    first_copy = next(i for i, (op, _) in enumerate(dockerfile()) if op == "COPY")
    workdir_at = next(i for i, (op, _) in enumerate(dockerfile()) if op == "WORKDIR")
    assert workdir_at < first_copy
    assert dockerfile_env()["PYTHONPATH"] == workdir


def test_rayjob_runs_a_shipped_config_on_its_cluster():
    """The entrypoint is `python -m jobs.<module> --config jobs/configs/<file> [key=value]`:
    the module exists with a main(), the config ships and parses with the job's own command
    line (raylens.cli.parse_job_args), data and runs are in S3, and the cluster has the GPUs
    and CPUs the config's Ray Train workers ask for."""
    doc = load_manifest(RAYJOB)
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], argv
    module = argv[2]
    assert module == "jobs.finetune"
    source = REPO / (module.replace(".", "/") + ".py")
    functions = {
        n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)
    }
    assert "main" in functions
    args = argv[3:]
    config = Path(args[args.index("--config") + 1])
    assert not config.is_absolute() and config.parts[:2] == ("jobs", "configs")
    assert (REPO / config).is_file(), config
    absolute = [str(REPO / a) if a == str(config) else a for a in args]
    cfg, _ = parse_job_args(absolute, prog=module, description="", sections=["run"])
    assert cfg.data.dataset.startswith("s3://") and cfg.run.output_dir.startswith("s3://")
    spec = cluster_spec(doc)
    containers = dict(ray_containers(doc))
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(containers[g["groupName"]])]
    total_gpus = sum(g["maxReplicas"] * gpus(containers[g["groupName"]]) for g in gpu_groups)
    assert cfg.ray.use_gpu and cfg.ray.num_workers <= total_gpus
    for g in gpu_groups:
        pod_cpus = quantity(containers[g["groupName"]]["resources"]["limits"]["cpu"])
        assert (cfg.ray.cpus_per_worker or 1) <= pod_cpus, g["groupName"]


def test_rayjob_entrypoint_check_fails_on_a_bad_config():
    """The same command-line parsing refuses what the job would refuse (exit status 2)."""
    config = REPO / "jobs" / "configs" / "tiny_vit_5m_224.yaml"
    with pytest.raises(SystemExit) as exc:
        parse_job_args(
            ["--config", str(config), "ray.num_workrs=4"], prog="x", description="", sections=[]
        )
    assert exc.value.code == 2


def serve_configs() -> tuple[dict, dict]:
    manifest = yaml.safe_load(load_manifest(RAYSERVICE)["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    return manifest, local


def test_rayservice_serves_raylens_as_serve_config_yaml_does():
    """serveConfigV2 passes Ray Serve's own schema, imports serve.app:build_app, its args pass
    raylens' settings validator, and it equals serve/config.yaml but for DELIBERATE."""
    manifest, local = serve_configs()
    for config in (manifest, local):
        ServeDeploySchema.model_validate(config)
    (app,) = manifest["applications"]
    assert app["import_path"] == "serve.app:build_app"
    module, attr = app["import_path"].split(":")
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    assert attr in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    settings = load_settings(app["args"])
    assert settings.models and all(m.run.startswith("s3://") for m in settings.models)
    assert settings.api_key_env == "RAYLENS_API_KEY"
    assert differences(manifest, local) == DELIBERATE


def test_serve_config_drift_is_caught():
    """A change beyond DELIBERATE shows up as a difference; bad args fail raylens' validator."""
    manifest, local = serve_configs()
    manifest["applications"][0]["args"]["top_k"] = 7
    assert differences(manifest, local) == DELIBERATE | {"applications[raylens].args.top_k"}
    manifest["applications"][0]["args"]["top_kk"] = 7
    with pytest.raises(ConfigError, match="top_kk"):
        load_settings(manifest["applications"][0]["args"])


def test_rayservice_cluster_fits_the_deployments():
    """The GPU worker group can hold every ModelServer replica the autoscaling allows, and
    the API key the app requires reaches every Ray container from a Secret."""
    doc = load_manifest(RAYSERVICE)
    manifest, _ = serve_configs()
    deployments = {d["name"]: d for d in manifest["applications"][0]["deployments"]}
    model = deployments["ModelServer"]
    replicas = model["autoscaling_config"]["max_replicas"]
    per_replica = model["ray_actor_options"]
    containers = dict(ray_containers(doc))
    (group,) = cluster_spec(doc)["workerGroupSpecs"]
    pod = containers[group["groupName"]]
    assert replicas * per_replica["num_gpus"] <= group["maxReplicas"] * gpus(pod)
    assert per_replica["num_cpus"] <= quantity(pod["resources"]["limits"]["cpu"])
    assert model["autoscaling_config"]["min_replicas"] <= group["minReplicas"] * gpus(pod)
    assert cluster_spec(doc)["enableInTreeAutoscaling"] is True
    for name, c in containers.items():
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert "raylens-api-key" in refs, name
