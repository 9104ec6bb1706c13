"""Calls from the ingress to the model deployment, and loading a model, without Ray: each
failure's status (queue full 503, slow 504, unknown 404, broken 503, a dead replica retried
once), the description cache, undecodable images named, load errors sorted and scrubbed,
and a replica's exception as Ray delivers it (``RayTaskError(ModelLoadError)``, built with
Ray's own class, no cluster) answered with its one-line message and nothing of Ray's text.
A fake deployment handle stands in for Serve's. No server, no Ray cluster."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import pytest
from raylens.schema import StorageConfig
from raylens.serving import responses
from raylens.serving.calls import ModelCalls, call_model, failure
from raylens.serving.errors import (
    ModelLoadError,
    ModelNotFound,
    RequestError,
    one_line,
    remote_cause,
)
from raylens.serving.handling import handle
from raylens.serving.loading import load_model
from raylens.serving.settings import LimitsConfig, load_settings
from raylens.serving.throttle import Throttle
from raylens.storage import Storage

from tests.test_embed import make_run

# What an error body must never hold: stack frames (`File "...", line 12, in f`), Ray's
# reprs, installed or server paths.
LEAKS = re.compile(
    r'File "|\bline \d+|Traceback|ray::|RayTaskError|RayActorError|ServeReplica|site-packages'
    r"|/work/|/tmp/|/home/|/srv/|(?:^|[\s'\"(=])/[^\s/]+/"
)


def assert_clean(text: str, *server_dirs, limit: int = 300) -> None:
    """``text`` (an error body or its detail) is short and shows nothing of the server:
    no traceback, no Ray repr, no path (in particular none under ``server_dirs``)."""
    assert len(text) < limit, (len(text), text)
    assert not LEAKS.search(text), (LEAKS.search(text).group(0), text)
    for d in server_dirs:
        assert str(d) not in text, (str(d), text)
        assert str(d).rstrip("/").rsplit("/", 1)[-1] + "/" not in text, (str(d), text)


class QueueFull(Exception):
    pass


class ReplicaDied(Exception):
    pass


def _call(outcomes: list, **kw):
    """call_model over a call that raises or returns each outcome in turn."""
    calls = []

    async def call():
        calls.append(1)
        out = outcomes.pop(0)
        if isinstance(out, float):
            await asyncio.sleep(out)
        if isinstance(out, BaseException):
            raise out
        return out

    opts = {"model_id": "fm", "timeout_s": 0.2, "retry_after_s": 2}
    opts.update(queue_full=(QueueFull,), replica_lost=(ReplicaDied,), **kw)
    return asyncio.run(call_model(call, **opts)), calls


def _refused(outcomes: list, status: int, error: str) -> RequestError:
    with pytest.raises(RequestError) as err:
        _call(outcomes)
    assert (err.value.status, err.value.error) == (status, error), err.value
    return err.value


def test_each_failure_of_a_model_call_answers_its_status():
    assert _call([{"ok": 1}]) == ({"ok": 1}, [1])
    err = _refused([QueueFull()], 503, "overloaded")
    assert err.headers == {"Retry-After": "2"} and "model queue is full" in err.detail
    err = _refused([1.0], 504, "timeout")
    assert err.detail == "model 'fm' took over 0.2s"
    err = _refused([ModelNotFound("unknown model 'fm'")], 404, "unknown_model")
    assert err.detail == "unknown model 'fm'"
    err = _refused([ModelLoadError("model 'fm' does not load: X")], 503, "model_unavailable")
    assert err.detail == "model 'fm' does not load: X" and err.headers == {"Retry-After": "2"}
    with pytest.raises(KeyError):  # anything else is the route's 500, not a guess
        _call([KeyError("x")])


def test_a_dead_replica_is_retried_once():
    assert _call([ReplicaDied(), "second try"]) == ("second try", [1, 1])
    err = _refused([ReplicaDied(), ReplicaDied(), "never"], 503, "model_unavailable")
    assert err.detail == "model replica unavailable; retry" and err.headers == {"Retry-After": "2"}


class FakeModels:
    """Stands in for ``handle.options(multiplexed_model_id=...)``: per model id, a
    ``describe`` and an ``infer`` whose ``.remote(...)`` returns an awaitable."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def handle_for(self, model_id: str):
        fake = self

        class Method:
            def __init__(self, name):
                self.name = name

            def remote(self, *args):
                fake.calls.append((model_id, self.name))

                async def result():
                    if self.name == "describe":
                        return {"id": model_id, "kind": "classify", "calls": len(fake.calls)}
                    (image,) = args
                    if image == b"bad":
                        return {"embedding": None, "probs": None, "error": "undecodable: x"}
                    if image == b"huge":
                        return {"embedding": None, "probs": None, "error": "too_large: 9 px"}
                    return {"embedding": np.ones(2), "probs": None, "error": None}

                return result()

        class Handle:
            describe, infer = Method("describe"), Method("infer")

        return Handle()


def test_model_calls_keep_descriptions_and_name_undecodable_images():
    fake = FakeModels()
    calls = ModelCalls(fake.handle_for, LimitsConfig(), queue_full=(), replica_lost=())
    first = asyncio.run(calls.describe("fm"))
    assert asyncio.run(calls.describe("fm")) is first and fake.calls == [("fm", "describe")]
    fresh = asyncio.run(calls.describe("fm", fresh=True))  # readiness asks every time
    assert fresh["calls"] == 2 and asyncio.run(calls.describe("fm")) is fresh
    outs = asyncio.run(calls.infer("fm", [(b"a", "input[0]"), (b"b", "input[1]")]))
    assert len(outs) == 2 and fake.calls[-2:] == [("fm", "infer")] * 2
    with pytest.raises(RequestError) as err:
        asyncio.run(calls.infer("fm", [(b"a", "input[0]"), (b"bad", "input[1]")]))
    assert (err.value.status, err.value.error) == (415, "not_an_image")
    assert err.value.detail == "input[1]: the image does not decode (undecodable: x)"
    with pytest.raises(RequestError) as err:
        asyncio.run(calls.infer("fm", [(b"huge", "image")]))
    assert (err.value.status, err.value.error) == (413, "image_too_large")


def test_failure_says_why_without_internals():
    async def ok():
        return 1

    async def refused():
        raise RequestError(503, "model_unavailable", "model 'b' does not load: ValueError: x")

    async def crashed():
        raise RuntimeError("internals /srv/raylens/x.py")

    assert asyncio.run(failure(ok())) is None
    assert asyncio.run(failure(refused())) == "model 'b' does not load: ValueError: x"
    assert asyncio.run(failure(crashed())) == (
        "the model replica failed (RuntimeError); see the server log"
    )

    # what Ray raises for a replica's RuntimeError: named by the replica's class, not Ray's
    async def crashed_remote():
        raise _ray_wrapped(RuntimeError("internals /srv/raylens/x.py"))

    got = asyncio.run(failure(crashed_remote()))
    assert got == "the model replica failed (RuntimeError); see the server log"


# ----------------------------------------------------------------------------- Ray's wrapper


def _ray_wrapped(cause: Exception) -> Exception:
    """``cause`` as an ``await`` on a Serve handle raises it when a replica raised it:
    Ray's ``RayTaskError(<cause's class>)``, whose text is the replica's traceback."""
    from ray.exceptions import RayTaskError

    frames = (
        "Traceback (most recent call last):\n"
        '  File "/work/main/.venv/lib/python3.11/site-packages/ray/serve/_private/'
        'replica.py", line 1620, in call_user_method\n'
        "    result = await method(*args, **kwargs)\n"
        '  File "/srv/raylens/serve/app.py", line 98, in _load\n'
        "    model = await asyncio.to_thread(\n"
        '  File "/srv/raylens/platform/raylens/serving/loading.py", line 44, in load_model\n'
        "    raise _load_failure(cfg, storage, entry, err) from None\n"
        f"{type(cause).__module__}.{type(cause).__name__}: {cause}"
    )
    wrapped = RayTaskError(
        "ServeReplica:raylens:ModelServer.handle_request",
        frames,
        cause,
        proctitle="ray::ServeReplica:raylens:ModelServer.handle_request",
        pid=4242,
        ip="10.0.0.7",
    )
    return wrapped.as_instanceof_cause()


def test_a_replica_error_wrapped_by_ray_answers_its_own_message():
    missing = ModelLoadError("model 'fm' is unavailable: its run 'fm' is missing (not trained)")
    err = _ray_wrapped(missing)
    # what the ingress used to answer: Ray's text, ~1 KB of frames, paths and reprs
    assert isinstance(err, ModelLoadError) and LEAKS.search(str(err))
    assert "ray::ServeReplica" in str(err) and "site-packages" in str(err)
    assert remote_cause(err) is missing and remote_cause(missing) is missing
    got = _refused([err], 503, "model_unavailable")
    assert got.detail == str(missing) and got.headers == {"Retry-After": "2"}
    got = _refused([_ray_wrapped(ModelNotFound("unknown model 'x'"))], 404, "unknown_model")
    assert got.detail == "unknown model 'x'"
    # a plain RayTaskError (Ray could not subclass the cause's class) is matched by its cause
    from ray.exceptions import RayTaskError

    plain = RayTaskError("f", "Traceback ...\nX", missing, proctitle="ray::X", pid=1, ip="1")
    assert not isinstance(plain, ModelLoadError)
    assert _refused([plain], 503, "model_unavailable").detail == str(missing)
    # any other replica failure is the route's 500 (its traceback to the log only)
    with pytest.raises(RuntimeError):
        _call([_ray_wrapped(RuntimeError("x"))])


class FailingModels:
    """A deployment handle whose every call raises ``errors[model_id]`` as Ray would."""

    def __init__(self, errors: dict[str, Exception]):
        self.errors = errors

    def handle_for(self, model_id: str):
        error = self.errors[model_id]

        class Method:
            def remote(self, *args):
                async def result():
                    raise _ray_wrapped(error)

                return result()

        class Handle:
            describe = infer = Method()

        return Handle()


def test_the_ingress_answers_replica_failures_in_one_clean_line(tmp_path):
    """The ingress's path for a model call (ModelCalls + handling, as serve/app.py wires
    them) over what a Serve handle raises: every body short and clean, /readyz too."""
    failing = FailingModels(
        {
            "missing": ModelLoadError(
                "model 'missing' is unavailable: its run 'missing' is missing (not trained "
                "yet, or moved)"
            ),
            "on-demand": ModelNotFound("unknown model 'on-demand': no run under the runs root"),
            "crash": RuntimeError(f"boom in {tmp_path}/x.py"),
        }
    )
    calls = ModelCalls(failing.handle_for, LimitsConfig(), queue_full=(), replica_lost=())

    def answer(mid: str):
        async def work():
            return {"desc": await calls.describe(mid)}

        return asyncio.run(
            handle(work, headers={}, key="", throttle=Throttle(4, 1), route="classify")
        )

    for mid, status, error in (
        ("missing", 503, "model_unavailable"),
        ("on-demand", 404, "unknown_model"),
        ("crash", 500, "internal_error"),
    ):
        a = answer(mid)
        assert (a.status, a.body["error"]) == (status, error), (mid, a.body)
        assert_clean(json.dumps(a.body), tmp_path)
    assert "'missing'" in answer("missing").body["detail"]

    async def ready():
        ids = ["missing", "crash"]
        why = await asyncio.gather(*(failure(calls.describe(m, fresh=True)) for m in ids))
        return responses.readiness(list(zip(ids, why, strict=True)))

    body, status = asyncio.run(ready())
    assert status == 503 and not body["ready"]
    assert body["models"]["missing"].startswith("model 'missing' is unavailable")
    assert body["models"]["crash"] == "the model replica failed (RuntimeError); see the server log"
    assert_clean(json.dumps(body), tmp_path)


def test_one_line_keeps_the_message_and_drops_frames_and_paths():
    assert one_line("model 'fm' does not load: x") == "model 'fm' does not load: x"
    assert one_line("a\n  b\tc") == "a b c"
    text = (
        "Traceback (most recent call last):\n"
        '  File "/srv/app.py", line 3, in f\n'
        "    g()\n"
        "ValueError: run 'fm': no labels.json in '/srv/runs/fm'"
    )
    assert one_line(text) == "ValueError: run 'fm': no labels.json in 'fm'"
    for path, name in (
        ("/tmp/pytest-0/runs/fm", "fm"),
        ("s3://bucket/runs/fm/checkpoints/epoch=3", "epoch=3"),
        ("gs://bucket/runs/fm/", "fm"),
        ("file:///srv/images/a.png", "a.png"),
        ("~/runs/fm", "fm"),
        ("../runs/fm", "fm"),
        ("runs/fm/checkpoints/epoch=2/model.safetensors", "model.safetensors"),
    ):
        assert one_line(f"no checkpoint at '{path}' (x)") == f"no checkpoint at '{name}' (x)"
    assert one_line("invalid JSON in header: EOF at line 1 column 0") == (
        "invalid JSON in header: EOF"
    )
    long = one_line("x" * 1000)
    assert len(long) == 240 and long.endswith("...")


# ----------------------------------------------------------------------------- loading


def test_loading_sorts_failures_into_not_found_and_unavailable(tmp_path):
    """Each way a model fails to load: the error class (404 or 503), a message naming the
    model and its run, and nothing of the server's paths or credentials."""
    secret = "s3cr3t-value"
    runs = tmp_path / f"runs-{secret}"  # a path that happens to hold the secret
    runs.mkdir()
    broken = runs / "broken"  # a config that does not load
    broken.mkdir()
    (broken / "labels.json").write_text(json.dumps({"classes": ["a", "b"]}))
    (broken / "config.yaml").write_text("model: {backbone: 3}\n")
    corrupt = runs / "corrupt"  # a run whose best checkpoint's weights are not safetensors
    make_run(Storage(), str(corrupt))
    (corrupt / "checkpoints/epoch=2/model.safetensors").write_bytes(b"\x00" * 64)
    incomplete = runs / "incomplete"  # a run whose best checkpoint is gone
    make_run(Storage(), str(incomplete))
    (incomplete / "checkpoints/epoch=2/state.json").unlink()
    ok = runs / "ok"
    make_run(Storage(), str(ok))
    cfg = load_settings(
        {
            "models": [
                {"id": "bb", "backbone": "no-such-backbone"},
                {"id": "gone", "run": str(tmp_path / "elsewhere/fm-gone")},
                {"id": "broken", "run": str(broken)},
                {"id": "corrupt", "run": str(corrupt)},
                {"id": "incomplete", "run": str(incomplete)},
                {"id": "ok", "run": str(ok)},
            ],
            "runs_root": str(runs),
        }
    )
    storage = Storage(StorageConfig(s3_secret_access_key=secret))

    def failed(mid: str, cls: type[Exception]) -> str:
        with pytest.raises(cls) as err:
            load_model(cfg, storage, mid, device="cpu")
        assert type(err.value) is cls, (mid, err.value)
        text = str(err.value)
        assert_clean(text, tmp_path, runs)
        assert secret not in text, text
        return text

    assert failed("../x", ModelNotFound) == "unknown model '../x'"
    assert failed("nothere", ModelNotFound) == (  # an on-demand id with no run: unknown
        "unknown model 'nothere': no run 'nothere' under the runs root"
    )
    assert failed("gone", ModelLoadError) == (  # configured, missing: unavailable, named
        "model 'gone' is unavailable: its run 'fm-gone' is missing (not trained yet, or moved)"
    )
    text = failed("broken", ModelLoadError)
    assert text.startswith("model 'broken' does not load: run")
    assert "'broken': its config.yaml does not load: config key 'model.backbone'" in text
    text = failed("corrupt", ModelLoadError)
    assert text.startswith("model 'corrupt' does not load: "), text
    text = failed("incomplete", ModelLoadError)
    assert text.startswith("model 'incomplete' does not load: run")
    assert "'incomplete': no complete checkpoint at 'epoch=2'" in text
    assert failed("bb", ModelLoadError).startswith(
        "model 'bb' does not load: UnknownBackbone: unknown backbone 'no-such-backbone'"
    )
    served = load_model(cfg, storage, "ok", device="cpu")
    assert served.model_id == "ok@epoch=2" and served.describe()["model_id"] == "ok@epoch=2"
