"""Calls from the ingress to the model deployment, and loading a model, without Ray: each
failure's status (queue full 503, slow 504, unknown 404, broken 503, a dead replica retried
once), the description cache, undecodable images named, load errors sorted and scrubbed.
A fake deployment handle stands in for Serve's. Pure: no Ray, no server."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from raylens.schema import StorageConfig
from raylens.serving.calls import ModelCalls, call_model, failure
from raylens.serving.errors import ModelLoadError, ModelNotFound, RequestError
from raylens.serving.loading import load_model
from raylens.serving.settings import LimitsConfig, load_settings
from raylens.storage import Storage


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
        raise RuntimeError("internals")

    assert asyncio.run(failure(ok())) is None
    assert asyncio.run(failure(refused())) == "model 'b' does not load: ValueError: x"
    assert asyncio.run(failure(crashed())) == "RuntimeError"


def test_loading_sorts_failures_into_not_found_and_does_not_load(tmp_path):
    secret = "s3cr3t-value"
    runs = tmp_path / f"runs-{secret}"  # a path that happens to hold the secret
    runs.mkdir()
    broken = runs / "broken"
    broken.mkdir()
    (broken / "labels.json").write_text(json.dumps({"classes": ["a", "b"]}))
    (broken / "config.yaml").write_text("model: {backbone: 3}\n")
    cfg = load_settings(
        {"models": [{"id": "bb", "backbone": "no-such-backbone"}], "runs_root": str(runs)}
    )
    storage = Storage(StorageConfig(s3_secret_access_key=secret))
    with pytest.raises(ModelNotFound, match=r"unknown model '\.\./x'"):
        load_model(cfg, storage, "../x", device="cpu")
    with pytest.raises(ModelNotFound, match="no labels.json") as err:
        load_model(cfg, storage, "missing", device="cpu")
    assert secret not in str(err.value) and "***" in str(err.value)
    with pytest.raises(
        ModelLoadError, match="'broken' does not load: .*config.yaml does not"
    ) as err:
        load_model(cfg, storage, "broken", device="cpu")
    assert secret not in str(err.value)
    with pytest.raises(ModelLoadError, match="'bb' does not load: UnknownBackbone: unknown"):
        load_model(cfg, storage, "bb", device="cpu")
