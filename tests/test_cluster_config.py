"""The Ray cluster launcher configs at the repo root (``cluster.yaml`` AWS, ``cluster.gcp.yaml``
GCP), checked the way ``ray up`` checks them and against what raylens needs. Pure: no Ray is
started, no cloud is called.

Ray's own checks (Ray 2.60, read in the installed package):
- ``ray/autoscaler/_private/commands.py`` ``_bootstrap_config``: ``prepare_config`` (the
  provider's ``defaults.yaml`` merged in, ``setup_commands`` merged into the head/worker
  lists, per-type min/max workers filled), then ``validate_config``, then the provider's
  ``bootstrap_config`` (cloud calls: IAM, key pairs, subnets; not run here).
- ``ray/autoscaler/_private/util.py`` ``validate_config``: ``jsonschema.validate`` against
  ``ray/autoscaler/ray-schema.json`` (``additionalProperties: false`` at the top level and per
  node type; ``resources`` values are integers >= 0), plus ``head_node_type`` in
  ``available_node_types`` and ``sum(min_workers) <= max_workers``.

Token authentication (ray/scripts/scripts.py, ray/_private/authentication/
authentication_token_setup.py): ``ray start --head`` enables it when RAY_AUTH_MODE=token or
(mode unset) a token exists, and refuses token mode without a token; ``ray start --address``
only checks for a token when the mode is token. So every ``ray start`` must run with
RAY_AUTH_MODE=token, the head must create the token first, and workers must get the same
token (``cluster_synced_files``: head -> workers before their start commands).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray._private.authentication.authentication_token_setup import _get_default_token_path
from ray._private.label_utils import validate_node_labels
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(REPO.glob("cluster*.yaml"))
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())

MIN_WORKER_DISK_GB = 200  # object spilling: a training shard's worth of decoded batches
MIN_HEAD_DISK_GB = 100  # logs, the dashboard's job artifacts, its own spilling

# GPUs per machine for the GPU instance types we use or would switch to (AWS EC2 and GCP
# accelerator-optimized machine types, whose GPUs come with the machine type).
MACHINE_GPUS = {
    "g4dn.xlarge": 1,
    "g4dn.2xlarge": 1,
    "g4dn.12xlarge": 4,
    "g5.xlarge": 1,
    "g5.2xlarge": 1,
    "g5.4xlarge": 1,
    "g5.8xlarge": 1,
    "g5.12xlarge": 4,
    "g5.48xlarge": 8,
    "g6.xlarge": 1,
    "g6.2xlarge": 1,
    "g6.12xlarge": 4,
    "p4d.24xlarge": 8,
    "p5.48xlarge": 8,
    "g2-standard-4": 1,
    "g2-standard-8": 1,
    "g2-standard-24": 2,
    "a2-highgpu-1g": 1,
    "a2-highgpu-4g": 4,
}
GPU_FAMILIES = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p5.", "g2-", "a2-", "a3-")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def launcher_view(raw: dict) -> dict:
    """The config as ``ray up`` validates it: prepared with the provider's defaults, validated.

    Ray's schema is checked on the file as written first: ``prepare_config`` assumes
    well-typed fields (a string ``setup_commands`` makes it raise a bare TypeError).
    """
    jsonschema.validate(raw, RAY_SCHEMA)
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def provider_type(cfg: dict) -> str:
    return cfg["provider"]["type"]


def machine(cfg: dict, node_config: dict) -> str:
    return node_config["InstanceType" if provider_type(cfg) == "aws" else "machineType"]


def machine_gpus(cfg: dict, node_config: dict) -> int | None:
    """GPUs the machine has: guestAccelerators (GCP N1), else the instance type's (table)."""
    attached = sum(a.get("acceleratorCount", 0) for a in node_config.get("guestAccelerators", []))
    if attached:
        return attached
    name = machine(cfg, node_config)
    if name in MACHINE_GPUS:
        return MACHINE_GPUS[name]
    return None if name.startswith(GPU_FAMILIES) else 0


def is_spot(cfg: dict, node_config: dict) -> bool:
    if provider_type(cfg) == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


def boot_disk_gb(cfg: dict, node_config: dict) -> int:
    if provider_type(cfg) == "aws":
        (root,) = [m for m in node_config["BlockDeviceMappings"] if m["DeviceName"] == "/dev/sda1"]
        return root["Ebs"]["VolumeSize"]
    (boot,) = [d for d in node_config["disks"] if d.get("boot")]
    return boot["initializeParams"]["diskSizeGb"]


def node_types(cfg: dict) -> dict[str, dict]:
    return cfg["available_node_types"]


def workers(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in node_types(cfg).items() if k != cfg["head_node_type"]}


def gpu_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in workers(cfg).items() if v["resources"].get("GPU", 0) > 0}


def ray_start_commands(cfg: dict) -> list[str]:
    return [
        c
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in cfg[key]
        if "ray start" in c
    ]


def home(cfg: dict) -> str:
    return f"/home/{cfg['auth']['ssh_user']}"


# --- raylens' checks: each returns the problems it finds (empty: fine) ---------------------


def check_node_roles(cfg: dict) -> list[str]:
    """A GPU type (GPUs in resources that the machine has), a CPU-only type, a 0-CPU head."""
    problems = []
    head = node_types(cfg)[cfg["head_node_type"]]
    if head["resources"] != {"CPU": 0}:
        problems.append(f"head resources {head['resources']}: expected {{CPU: 0}} (drivers only)")
    gpus = gpu_types(cfg)
    if not gpus:
        problems.append("no worker type with GPU in its resources")
    for name, t in gpus.items():
        has = machine_gpus(cfg, t["node_config"])
        if has is None:
            problems.append(f"{name}: unknown GPU machine {machine(cfg, t['node_config'])}")
        elif has != t["resources"]["GPU"]:
            problems.append(f"{name}: resources GPU {t['resources']['GPU']}, machine has {has}")
    cpu_only = [
        name
        for name, t in workers(cfg).items()
        if t["resources"].get("CPU", 0) > 0
        and t["resources"].get("GPU") == 0
        and machine_gpus(cfg, t["node_config"]) == 0
    ]
    if not cpu_only:
        problems.append("no CPU-only worker type (resources CPU > 0, GPU: 0, no GPU machine)")
    return problems


def check_spot(cfg: dict) -> list[str]:
    """Spot for the CPU type and a GPU type; an on-demand GPU type for serving."""
    problems = []
    spot = {name for name, t in workers(cfg).items() if is_spot(cfg, t["node_config"])}
    gpus = set(gpu_types(cfg))
    if not spot:
        problems.append("no spot worker type")
    if not (spot & gpus):
        problems.append("no spot GPU type (training is checkpointed, it can take preemption)")
    if not (gpus - spot):
        problems.append("no on-demand GPU type (for Serve replicas)")
    for name in set(workers(cfg)) - gpus - spot:
        problems.append(f"{name}: CPU workers should be spot (Ray Data tasks are retried)")
    market = {
        name: t.get("labels", {}).get("raylens.io/market") for name, t in workers(cfg).items()
    }
    for name, label in market.items():
        want = "spot" if name in spot else "on-demand"
        if label != want:
            problems.append(f"{name}: label raylens.io/market={label}, is {want}")
    return problems


def check_disks(cfg: dict) -> list[str]:
    """Boot disks big enough for object spilling (it goes there, see check_spilling)."""
    problems = []
    for name, t in node_types(cfg).items():
        size = boot_disk_gb(cfg, t["node_config"])
        least = MIN_HEAD_DISK_GB if name == cfg["head_node_type"] else MIN_WORKER_DISK_GB
        if size < least:
            problems.append(f"{name}: boot disk {size} GB < {least} GB")
    return problems


def check_spilling(cfg: dict) -> list[str]:
    """Every ``ray start`` spills to a directory on the (big) boot disk, created first."""
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmds = cfg[key]
        for i, cmd in enumerate(cmds):
            if "ray start" not in cmd:
                continue
            m = re.search(r"--object-spilling-directory[= ](\S+)", cmd)
            if not m:
                problems.append(f"{key}: `ray start` without --object-spilling-directory")
                continue
            spill = m.group(1)
            if not spill.startswith(home(cfg) + "/"):
                problems.append(f"{key}: spilling to {spill}, not on the boot disk's {home(cfg)}")
            if not any(f"mkdir -p {spill}" in c for c in cmds[:i]):
                problems.append(f"{key}: {spill} is not created before `ray start`")
    return problems


def check_token_auth(cfg: dict) -> list[str]:
    """Token auth on every node: mode set on each ``ray start``, one token, on every node."""
    problems = []
    for cmd in ray_start_commands(cfg):
        before = cmd.split("ray start")[0]
        if not re.search(r"(export )?RAY_AUTH_MODE=token\b", before):
            problems.append(f"`{cmd.strip()[:60]}...` does not run with RAY_AUTH_MODE=token")
    head = cfg["head_start_ray_commands"]
    start = next((i for i, c in enumerate(head) if "ray start --head" in c), None)
    generate = next((i for i, c in enumerate(head) if "ray get-auth-token --generate" in c), None)
    if start is None:
        problems.append("no `ray start --head` in head_start_ray_commands")
    elif generate is None or generate > start:
        problems.append("the head does not create its token before `ray start --head`")
    if generate is not None and "> /dev/null" not in head[generate]:
        problems.append("`ray get-auth-token --generate` prints the token into the launcher's log")
    token = f"{home(cfg)}/{_get_default_token_path().relative_to(Path.home())}"
    if token not in cfg.get("cluster_synced_files", []):
        problems.append(f"{token} (Ray's default token path) is not synced to the workers")
    text = json.dumps(cfg)
    if re.search(r"RAY_AUTH_MODE=disabled", text):
        problems.append("RAY_AUTH_MODE=disabled somewhere")
    return problems


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pip_requirements(cmd: str) -> list[Requirement]:
    """Requirement specs named in a `pip install` command (not flags, paths or options)."""
    words = shlex.split(cmd)
    if "install" not in words:
        return []
    out, skip = [], False
    for w in words[words.index("install") + 1 :]:
        if skip:
            skip = False
        elif w in ("-e", "--editable", "--python", "-r", "-c", "--index-url"):
            skip = True
        elif not w.startswith(("-", "/", "~", ".")):
            out.append(Requirement(w))
    return out


def check_install(cfg: dict) -> list[str]:
    """setup_commands install the mounted repo (so pyproject.toml's deps) and pin as it does."""
    problems = []
    mounts = [r for r, local in cfg["file_mounts"].items() if (REPO / local).resolve() == REPO]
    if len(mounts) != 1:
        return [f"the repo root is mounted {len(mounts)} times (file_mounts), expected once"]
    (repo,) = mounts
    installs = [c for c in cfg["setup_commands"] if "pip install" in c]
    editable = [c for c in installs if f"-e {repo}" in c or f"--editable {repo}" in c]
    if not editable:
        problems.append(f"no `pip install -e {repo}` (the mounted repo) in setup_commands")
    deps = {Requirement(d).name: Requirement(d) for d in pyproject()["project"]["dependencies"]}
    for cmd in installs:
        for req in pip_requirements(cmd):
            if req.name in deps and req.specifier != deps[req.name].specifier:
                problems.append(f"{req} vs pyproject.toml's {deps[req.name]}")
    ray_pins = [r for c in installs for r in pip_requirements(c) if r.name == "ray"]
    if not ray_pins or any(r.specifier != deps["ray"].specifier for r in ray_pins):
        problems.append("setup_commands do not pin ray as pyproject.toml does")
    if "default" not in {e for r in ray_pins for e in r.extras}:
        problems.append("ray[default] (dashboard, autoscaler) is not installed on the nodes")
    if ".gitignore" not in cfg.get("rsync_filter", []):
        problems.append("rsync_filter lacks .gitignore: `ray up` would upload .venv/, data/")
    return problems


CHECKS: list[Callable[[dict], list[str]]] = [
    check_node_roles,
    check_spot,
    check_disks,
    check_spilling,
    check_token_auth,
    check_install,
]


# --- tests --------------------------------------------------------------------------------


def test_both_cluster_files_are_here():
    assert [p.name for p in CLUSTER_FILES] == ["cluster.gcp.yaml", "cluster.yaml"]
    assert {provider_type(load(p)) for p in CLUSTER_FILES} == {"aws", "gcp"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_up_validates_it(path):
    raw = load(path)
    cfg = launcher_view(raw)
    head = node_types(cfg)[cfg["head_node_type"]]
    assert head["max_workers"] == 0
    assert sum(t["min_workers"] for t in node_types(cfg).values()) <= cfg["max_workers"]
    assert sum(t["max_workers"] for t in workers(cfg).values()) <= cfg["max_workers"]
    for t in node_types(
        cfg
    ).values():  # the launcher hands them to `ray start` (RAY_OVERRIDE_LABELS)
        validate_node_labels(t.get("labels", {}))
    # our setup_commands replace the provider's default ones (which install a nightly wheel)
    assert cfg["setup_commands"] == raw["setup_commands"]
    assert cfg["worker_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]


BROKEN: dict[str, tuple[Callable[[dict], None], type[Exception]]] = {
    "unknown top-level key": (lambda c: c.update(max_worker=4), jsonschema.ValidationError),
    "resources as a string": (
        lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="1"),
        jsonschema.ValidationError,
    ),
    "negative resources": (
        lambda c: c["available_node_types"]["cpu_worker"]["resources"].update(CPU=-1),
        jsonschema.ValidationError,
    ),
    "unknown node type key": (
        lambda c: c["available_node_types"]["cpu_worker"].update(instance_type="c6i.4xlarge"),
        jsonschema.ValidationError,
    ),
    "node type without resources": (
        lambda c: c["available_node_types"]["cpu_worker"].pop("resources"),
        jsonschema.ValidationError,
    ),
    "commands not a list": (
        lambda c: c.update(setup_commands="pip install -e ."),
        jsonschema.ValidationError,
    ),
    "head type not a node type": (lambda c: c.update(head_node_type="ray.head"), ValueError),
    "min_workers above max_workers": (
        lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=99),
        ValueError,
    ),
}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("broken", BROKEN, ids=str)
def test_ray_rejects_a_broken_copy(path, broken):
    """The validator above can fail: the same code rejects deliberately broken copies."""
    raw = load(path)
    launcher_view(raw)
    mutate, error = BROKEN[broken]
    mutate(raw)
    with pytest.raises(error):
        launcher_view(raw)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_what_raylens_needs(path, check):
    assert check(launcher_view(load(path))) == []


def _set(path: str, value) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return mutate


def _drop_auth_mode(cfg: dict) -> None:
    cfg["worker_start_ray_commands"] = [
        re.sub(r"\bRAY_AUTH_MODE=token\b", "", c) for c in cfg["worker_start_ray_commands"]
    ]


def _on_demand(cfg: dict) -> None:
    for t in workers(cfg).values():
        t["node_config"].pop("InstanceMarketOptions", None)
        t["node_config"].pop("scheduling", None)


def _set_disk(cfg: dict, name: str, gb: int) -> None:
    nc = cfg["available_node_types"][name]["node_config"]
    if provider_type(cfg) == "aws":
        nc["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] = gb
    else:
        nc["disks"][0]["initializeParams"]["diskSizeGb"] = gb


FAULTS: dict[str, tuple[Callable[[dict], None], Callable[[dict], list[str]], str]] = {
    "head with CPUs": (
        _set("available_node_types.head.resources", {"CPU": 8}),
        check_node_roles,
        "head resources",
    ),
    "GPU on the CPU type": (
        _set("available_node_types.cpu_worker.resources", {"CPU": 16, "GPU": 1}),
        check_node_roles,
        "CPU-only",
    ),
    "more GPUs than the machine": (
        _set("available_node_types.gpu_worker.resources", {"CPU": 8, "GPU": 4}),
        check_node_roles,
        "machine has 1",
    ),
    "no spot": (_on_demand, check_spot, "no spot"),
    "small disk": (
        lambda c: _set_disk(c, "cpu_worker", 50),
        check_disks,
        "cpu_worker: boot disk 50 GB",
    ),
    "spilling on /tmp": (
        lambda c: c.update(
            worker_start_ray_commands=[
                x.replace(
                    "--object-spilling-directory=/home/ubuntu/ray-spill",
                    "--object-spilling-directory=/tmp/spill",
                )
                for x in c["worker_start_ray_commands"]
            ]
        ),
        check_spilling,
        "/tmp/spill",
    ),
    "worker without RAY_AUTH_MODE": (_drop_auth_mode, check_token_auth, "RAY_AUTH_MODE=token"),
    "token not synced": (_set("cluster_synced_files", []), check_token_auth, "not synced"),
    "auth disabled": (
        lambda c: c["setup_commands"].append("echo 'export RAY_AUTH_MODE=disabled' >> ~/.bashrc"),
        check_token_auth,
        "disabled",
    ),
    "token generated after start": (
        lambda c: c["head_start_ray_commands"].append(c["head_start_ray_commands"].pop(1)),
        check_token_auth,
        "before `ray start --head`",
    ),
    "other ray pin": (
        lambda c: c.update(
            setup_commands=[
                x.replace("ray[default]==2.60.0", "ray[default]==2.59.0")
                for x in c["setup_commands"]
            ]
        ),
        check_install,
        "pyproject.toml",
    ),
    "raylens not installed": (
        lambda c: c.update(
            setup_commands=[x.replace(" -e /home/ubuntu/raylens", "") for x in c["setup_commands"]]
        ),
        check_install,
        "pip install -e",
    ),
}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("fault", FAULTS, ids=str)
def test_our_checks_catch_a_broken_copy(path, fault):
    """Each raylens check fails on a copy broken the way it guards against."""
    mutate, check, expect = FAULTS[fault]
    cfg = launcher_view(load(path))
    assert check(cfg) == []
    mutate(cfg)
    problems = check(cfg)
    assert any(expect in p for p in problems), problems


def test_aws_and_gcp_configs_agree():
    """Same cluster on both clouds: node types, resources, scaling, spot-ness, disks, commands."""
    aws, gcp = (launcher_view(load(REPO / name)) for name in ("cluster.yaml", "cluster.gcp.yaml"))
    assert (provider_type(aws), provider_type(gcp)) == ("aws", "gcp")
    assert aws["head_node_type"] == gcp["head_node_type"]
    assert node_types(aws).keys() == node_types(gcp).keys()
    for name in node_types(aws):
        a, g = node_types(aws)[name], node_types(gcp)[name]
        for key in ("resources", "min_workers", "max_workers", "labels"):
            assert a.get(key) == g.get(key), f"{name}.{key}"
        assert is_spot(aws, a["node_config"]) == is_spot(gcp, g["node_config"]), name
        assert boot_disk_gb(aws, a["node_config"]) == boot_disk_gb(gcp, g["node_config"]), name
        assert machine_gpus(aws, a["node_config"]) == machine_gpus(gcp, g["node_config"]), name
    for key in (
        "cluster_name",
        "max_workers",
        "idle_timeout_minutes",
        "upscaling_speed",
        "auth",
        "file_mounts",
        "rsync_exclude",
        "rsync_filter",
        "cluster_synced_files",
        "setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert aws[key] == gcp[key], key
    # the head's extra packages differ only by the autoscaler's cloud SDK
    sdk = {"aws": "boto3", "gcp": "google-api-python-client"}
    for cfg in (aws, gcp):
        extra = cfg["head_setup_commands"][len(cfg["setup_commands"]) :]
        names = {r.name for c in extra for r in pip_requirements(c)}
        assert names == {sdk[provider_type(cfg)]}, names


def test_gcp_specifics():
    """GCP: project and zone set; GPUs attached with TERMINATE on host maintenance; spot by
    provisioningModel; disk types and service accounts name the configured zone and project."""
    cfg = launcher_view(load(REPO / "cluster.gcp.yaml"))
    provider = cfg["provider"]
    assert isinstance(provider["project_id"], str) and provider["project_id"]
    zone = provider["availability_zone"]
    assert zone.startswith(provider["region"] + "-")
    for name, t in node_types(cfg).items():
        nc = t["node_config"]
        # Ray's GCP provider treats a node_config with machineType as a Compute Engine VM
        # (ray/autoscaler/_private/gcp/node.py get_node_type), else as a TPU
        assert "machineType" in nc, name
        for disk in nc["disks"]:
            disk_type = disk["initializeParams"].get("diskType", "")
            assert disk_type.startswith(f"zones/{zone}/diskTypes/pd-"), (name, disk_type)
        if name != cfg["head_node_type"]:
            (account,) = nc["serviceAccounts"]
            assert account["email"].endswith(f"@{provider['project_id']}.iam.gserviceaccount.com")
        if is_spot(cfg, nc):
            assert nc["scheduling"]["instanceTerminationAction"] == "DELETE", name
            assert nc["scheduling"]["automaticRestart"] is False, name
    for name, t in gpu_types(cfg).items():
        nc = t["node_config"]
        assert nc["guestAccelerators"][0]["acceleratorType"].startswith("nvidia-"), name
        assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE", name
        (boot,) = [d for d in nc["disks"] if d["boot"]]
        assert "deeplearning-platform-release" in boot["initializeParams"]["sourceImage"], name
        assert {"key": "install-nvidia-driver", "value": "True"} in nc["metadata"]["items"], name


def test_aws_specifics():
    """AWS: GPU nodes boot the Deep Learning AMI with the NVIDIA driver, others plain Ubuntu;
    spot through InstanceMarketOptions; gp3 root volumes on Ubuntu's root device."""
    cfg = launcher_view(load(REPO / "cluster.yaml"))
    assert cfg["provider"]["cache_stopped_nodes"] is False  # spot instances cannot be stopped
    for name, t in node_types(cfg).items():
        nc = t["node_config"]
        image = nc["ImageId"]
        assert image.startswith("resolve:ssm:/aws/service/"), (name, image)
        wants_driver = name in gpu_types(cfg)
        assert ("nvidia-driver" in image) == wants_driver, (name, image)
        (root,) = nc["BlockDeviceMappings"]
        assert root["DeviceName"] == "/dev/sda1" and root["Ebs"]["VolumeType"] == "gp3", name
