"""The fine-tune job on a real Ray cluster, as users run it: ``ray start --head`` (token auth
on), then ``ray job submit --working-dir <repo> -- python -m jobs.finetune --config ...``.

The head runs in its own session with its own ``--temp-dir``, ``HOME`` (so its own
``~/.ray/auth_token``) and free loopback ports, so it never touches the shared
``ray_session`` of conftest nor the user's ``~/.ray``; it is torn down by signalling its
own processes only (never ``ray stop``, which kills every Ray of the user).

What Ray 2.60 does here (read in ray/scripts/scripts.py, ray/_private/...):
- ``ray start --head`` turns token auth on when ``RAY_AUTH_MODE`` is unset and a token
  exists (``maybe_enable_token_auth_if_token_available``); ``ray get-auth-token --generate``
  writes one to ``Path.home() / ".ray/auth_token"``; clients send it only with
  ``RAY_AUTH_MODE=token`` (dashboard_sdk -> ``get_auth_headers_if_auth_enabled``).
- ``ray start`` writes the address a bare ``ray.init()`` would join to
  ``<temp-dir>/ray_current_cluster``: with our own ``--temp-dir`` that is not /tmp/ray.
- SIGTERM to ``ray start --block`` first drains the node for up to
  ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` (30 s); 0 tears down at once.
- Workers get their own process groups but stay in the head's session: leftovers are
  found by session id (and by the temp dir in their command lines).

The cluster's Python does not have raylens: the head runs from a venv that sees this venv's
site-packages through a plain path line in a ``.pth`` file, so Ray, torch... import but the
editable raylens install (its own ``.pth``, processed only in a site dir) does not. The job
gets the library from ``deploy/runtime_env.yaml`` (``py_modules: [platform/raylens]``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from raylens.storage import Storage

from tests.servers import free_ports
from tests.sourcegen import prepare_quiet, write_folder

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = "deploy/runtime_env.yaml"  # relative: `ray job submit` runs in REPO
# where a bare ray.init() looks for a `ray start` cluster (ray._common.utils.get_ray_address_file)
_SYSTEM_TMP = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
DEFAULT_RAY_ADDRESS_FILE = Path(_SYSTEM_TMP) / "ray" / "ray_current_cluster"
PORT_FLAGS = (
    "--port",  # GCS
    "--dashboard-port",  # dashboard + job server (HTTP)
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)


def make_env_without_raylens(root: Path) -> Path:
    """A venv at ``root`` whose Python imports this venv's packages but not raylens; returns
    its bin dir, which holds ``python`` and a ``ray`` console script."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(root)}))
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    # a bare path line: the directory joins sys.path, its own .pth files are not run
    (purelib / "raylens_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    bin_dir = root / "bin"
    ray = bin_dir / "ray"
    ray.write_text(
        f"#!{bin_dir / 'python'}\nimport sys\nfrom ray.scripts.scripts import main\n"
        "sys.exit(main())\n"
    )
    ray.chmod(0o755)
    return bin_dir


def _base_env(home: Path, bin_dir: Path) -> dict[str, str]:
    """This process's env minus every RAY_* (conftest's ray.init sets RAY_AUTH_MODE here;
    RAY_ADDRESS would redirect the CLI) and PYTHONPATH, with our HOME and ``bin_dir`` first
    on PATH (the job's ``python``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env.update(
        HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",  # the cluster's own env: no hub here
    )
    return env


def _http(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as err:
        return 0, str(err)


def _proc_info(pid: int) -> tuple[int, str, str] | None:
    """(session id, state, command line) of a live process, None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # state ppid pgrp session ...
    return int(fields[3]), fields[0], cmd.strip()


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"<no {path}>"


def _set_pdeathsig() -> None:  # in the child: SIGTERM the head (a clean teardown) if pytest dies
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class RayHead:
    """A ``ray start --head --block`` in its own session; :meth:`stop` tears it down."""

    temp_dir: Path  # short: Ray's unix socket paths live under it
    home: Path
    bin_dir: Path  # the cluster's Python (no raylens) and its `ray`
    log_path: Path
    logs_copy: Path
    ports: dict[str, int]
    proc: subprocess.Popen | None = None
    leftovers: list[str] = field(default_factory=list)
    stop_seconds: float = 0.0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def env(self, *, token: bool = True) -> dict[str, str]:
        """Client env: the head's HOME; with ``token`` the CLI sends ~/.ray/auth_token."""
        env = _base_env(self.home, self.bin_dir)
        if token:
            env["RAY_AUTH_MODE"] = "token"
        return env

    def cli(
        self, *args: str, token: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin_dir / "ray"), *args],
            env=self.env(token=token),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 90) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        gen = subprocess.run(
            [str(self.bin_dir / "ray"), "get-auth-token", "--generate"],
            env=_base_env(self.home, self.bin_dir),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.strip() == self.token  # written under our HOME, not the user's
        env = _base_env(
            self.home, self.bin_dir
        )  # RAY_AUTH_MODE unset: `ray start` enables it (token exists)
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        argv = [str(self.bin_dir / "ray"), "start", "--head", "--block", "--disable-usage-stats"]
        argv += [f"--temp-dir={self.temp_dir}", "--dashboard-host=127.0.0.1"]
        argv += ["--num-cpus=3", "--include-dashboard=true"]  # Ray Data 1 CPU + 1 worker x 2
        argv += ["--min-worker-port=0", "--max-worker-port=0"]  # OS-picked: no clash
        argv += [f"--object-store-memory={512 * 1024**2}"]
        argv += [f"{flag}={port}" for flag, port in self.ports.items()]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.home,
                start_new_session=True,  # own session and process group
                preexec_fn=_set_pdeathsig,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited rc={self.proc.returncode}:\n{self.diag()}")
            # up: the job server answers, and `ray start` has written the cluster address
            status, _ = _http(f"{self.dashboard}/api/jobs/", self.token)
            if status == 200 and (self.temp_dir / "ray_current_cluster").exists():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"job server not up after {timeout:.0f}s:\n{self.diag()}")
            time.sleep(0.5)

    def _ours(self) -> list[tuple[int, str]]:
        """Live processes of this cluster: in the head's session or naming its temp dir."""
        assert self.proc is not None
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            info = _proc_info(int(entry.name))
            if (
                info
                and info[1] != "Z"
                and (info[0] == self.proc.pid or str(self.temp_dir) in info[2])
            ):
                out.append((int(entry.name), info[2][:160]))
        return out

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the head (it stops its raylet, GCS, workers), SIGKILL its group after
        ``timeout``; then SIGKILL, one by one, any process of ours still alive and record it
        in :attr:`leftovers`. Copies the session logs out of the temp dir. Idempotent."""
        if self.proc is None:
            return
        t0 = time.monotonic()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)  # pgid == pid: still ours
                    self.proc.wait(timeout=10)
            deadline = time.monotonic() + 10  # workers may take a moment to exit
            while (alive := self._ours()) and time.monotonic() < deadline:
                time.sleep(0.2)
            self.leftovers = [f"{pid} {cmd}" for pid, cmd in alive]
            for pid, _ in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.stop_seconds = time.monotonic() - t0
        finally:
            self.proc = None
            with contextlib.suppress(OSError):
                shutil.copytree(
                    (self.temp_dir / "session_latest").resolve() / "logs",
                    self.logs_copy,
                    ignore_dangling_symlinks=True,
                    dirs_exist_ok=True,
                )
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def diag(self, job_id: str | None = None) -> str:
        parts = [f"--- ray start log ({self.log_path}):\n{_tail(self.log_path)}"]
        if job_id and self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                logs = self.cli("job", "logs", "--address", self.dashboard, job_id, timeout=30)
                parts.append(
                    f"--- ray job logs {job_id}:\n{logs.stdout[-8000:]}{logs.stderr[-2000:]}"
                )
        return "\n".join(parts)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    user_token = Path.home() / ".ray" / "auth_token"
    address_file_before = (
        DEFAULT_RAY_ADDRESS_FILE.read_text() if DEFAULT_RAY_ADDRESS_FILE.exists() else None
    )
    # Ray's unix sockets live under --temp-dir (paths <= 107 bytes): tmp_path is too long
    temp_dir = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    bin_dir = make_env_without_raylens(root / "venv")
    probe = "import ray, torch, timm, pyarrow; import raylens"
    res = subprocess.run([bin_dir / "python", "-c", probe], capture_output=True, text=True)
    assert res.returncode == 1 and "No module named 'raylens'" in res.stderr, res.stderr
    head = RayHead(
        temp_dir=temp_dir,
        home=root / "home",
        bin_dir=bin_dir,
        log_path=root / "ray-start.log",
        logs_copy=root / "ray-logs",
        ports=ports,
    )
    try:
        head.start()
        gcs = f":{ports['--port']}"
        assert gcs in (head.temp_dir / "ray_current_cluster").read_text()
        token = head.token
        yield head
    finally:
        head.stop()
        print(f"ray head: teardown {head.stop_seconds:.1f}s, logs in {head.logs_copy}")
    # nothing of this cluster outlives it, and a bare ray.init() here still starts its own Ray
    assert head.leftovers == [], "processes left after teardown:\n" + "\n".join(head.leftovers)
    now = DEFAULT_RAY_ADDRESS_FILE.read_text() if DEFAULT_RAY_ADDRESS_FILE.exists() else None
    assert now == address_file_before or gcs not in (now or "")
    assert not (user_token.exists() and user_token.read_text().strip() == token)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # conftest's ray_session: separate, still up
        assert not ray.get_runtime_context().gcs_address.endswith(gcs)
        assert ray.cluster_resources().get("CPU", 0) > 0


@pytest.mark.ray
def test_job_submit_without_the_token_is_refused(ray_head, tmp_path):
    marker = tmp_path / "ran"
    res = ray_head.cli(
        "job",
        "submit",
        "--address",
        ray_head.dashboard,
        "--",
        "python",
        "-c",
        f"open({str(marker)!r}, 'w')",
        token=False,  # RAY_AUTH_MODE unset: the CLI sends no token
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Authentication required" in out, out[-3000:]
    assert (_http(f"{ray_head.dashboard}/api/jobs/"))[0] == 401
    assert (_http(f"{ray_head.dashboard}/api/jobs/", "0" * 32))[0] == 403
    status, body = _http(f"{ray_head.dashboard}/api/jobs/", ray_head.token)
    assert status == 200 and "open(" not in body  # no job was created
    assert not marker.exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_finetune_job_on_a_ray_start_cluster_with_token_auth(ray_head, tmp_path):
    storage = Storage()
    write_folder(storage, str(tmp_path / "raw"), per_class=10)
    card = prepare_quiet(storage, str(tmp_path / "raw"), str(tmp_path / "ds"))
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "from-yaml", "output_dir": str(tmp_path / "runs")},
                "data": {"dataset": str(tmp_path / "ds"), "image_size": 16, "batch_size": 8},
                "model": {"backbone": "vgg_s16"},
                "train": {"epochs": 2, "lr": 0.005, "warmup_epochs": 0.5},
                "ray": {"num_workers": 1},
            }
        )
    )
    job_id = f"raylens-test-{uuid.uuid4().hex[:8]}"
    argv = ["job", "submit", "--address", ray_head.dashboard, "--submission-id", job_id]
    argv += ["--working-dir", str(REPO), "--runtime-env", RUNTIME_ENV, "--"]
    # where the job's raylens comes from, then the job as users run it (the CLI shell-quotes
    # each argument of the entrypoint, hence sh -c for the &&)
    argv += [
        "sh",
        "-c",
        "python -c 'import raylens; print(\"raylens from\", raylens.__file__)' && "
        f"python -m jobs.finetune --config {config} run.name=cluster",
    ]
    t0 = time.monotonic()
    try:
        res = ray_head.cli(*argv, timeout=240)
    except subprocess.TimeoutExpired:
        diag = ray_head.diag(job_id)
        ray_head.cli("job", "stop", "--address", ray_head.dashboard, "--no-wait", job_id)
        pytest.fail(f"job {job_id} not done after 240 s\n{diag}")
    seconds = time.monotonic() - t0
    out = res.stdout + res.stderr
    print(f"ray job submit: rc={res.returncode}, {seconds:.1f}s")
    assert res.returncode == 0 and f"Job '{job_id}' succeeded" in out, (
        f"{out[-6000:]}\n{ray_head.diag(job_id)}"
    )

    status, body = _http(f"{ray_head.dashboard}/api/jobs/{job_id}", ray_head.token)
    job = json.loads(body) if status == 200 else {}
    assert job.get("status") == "SUCCEEDED", (status, body[-2000:])
    assert job["driver_exit_code"] in (0, None)
    # the driver joined this cluster (RAY_ADDRESS), not a local Ray of its own
    assert "Connected to Ray cluster" in out and "Started a local Ray instance" not in out

    # the working dir went up without .venv, data/, runs/ (.gitignore is honoured)
    session = (ray_head.temp_dir / "session_latest").resolve()
    pkgs = [p for p in session.glob("runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(pkgs) == 1 and (pkgs[0] / "jobs" / "finetune.py").is_file(), pkgs
    assert not any((pkgs[0] / d).exists() for d in (".venv", "data", "runs", ".git"))
    # raylens came with the job: runtime_env.yaml's py_modules, not the cluster's Python
    mods = list(session.glob("runtime_resources/py_modules_files/_ray_pkg_*/raylens"))
    assert len(mods) == 1 and (mods[0] / "train" / "images.py").is_file(), mods
    assert f"raylens from {mods[0] / '__init__.py'}" in out, out[-3000:]
    size = sum(f.stat().st_size for f in pkgs[0].rglob("*") if f.is_file())
    assert size < 5 * 1024**2, f"working_dir upload is {size / 1024**2:.1f} MiB"

    run = tmp_path / "runs" / "cluster"  # run.name override after --config wins
    assert f"run dir: {run}" in out
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2], metrics
    assert all(m["train/loss"] == m["train/loss"] for m in metrics)  # not NaN
    best = json.loads((run / "best.json").read_text())
    assert best["epoch"] in (1, 2) and best["checkpoint"] == f"checkpoints/epoch={best['epoch']}"
    assert (run / best["checkpoint"] / "model.safetensors").stat().st_size > 0
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["split"] == "test" and test["count"] == card["splits"]["test"]["count"]
    assert 0.0 <= test["top1"] <= 1.0
    assert not (tmp_path / "runs" / "from-yaml").exists()
    assert f"report: {run / 'report' / 'report.md'}" in out
    assert "![learning_curves.png]" in (run / "report" / "report.md").read_text()


def test_runtime_env_files_ship_raylens_and_pin_pyprojects_dependencies():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    plain = yaml.safe_load((REPO / RUNTIME_ENV).read_text())
    pip = yaml.safe_load((REPO / "deploy" / "runtime_env.pip.yaml").read_text())
    for env in (plain, pip):
        assert env["py_modules"] == ["platform/raylens"]
        assert (REPO / env["py_modules"][0] / "__init__.py").is_file()
        assert "working_dir" not in env  # `--working-dir .` gives it, from where users run
    assert "pip" not in plain
    assert pip["pip"] == deps, "deploy/runtime_env.pip.yaml's pip list drifted from pyproject"
