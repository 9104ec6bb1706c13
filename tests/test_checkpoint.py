"""Checkpoint round trips: identical tensors, and training resumed from a checkpoint continues
exactly as uninterrupted training would (model, AdamW state, scheduler)."""

from __future__ import annotations

import copy

import pytest
import torch
from raylens.checkpoint import load_checkpoint, save_checkpoint
from raylens.storage import Storage


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    return model, opt, sched


def _steps(model, opt, sched, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


# Local only: a checkpoint is plain Storage reads and writes (tests/test_storage.py runs
# those on S3 and GCS); test_finetune.py saves and resumes a run's checkpoints on S3.
@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_round_trip_is_identical(store):
    storage, root = store
    model, opt, sched = _setup()
    _steps(model, opt, sched, 3, seed=1)
    uri = f"{root}/ckpt/epoch=1"
    save_checkpoint(
        storage,
        uri,
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        extra={"epoch": 1, "metrics": {"top1": 0.5}},
    )
    ck = load_checkpoint(storage, uri)
    for k, v in model.state_dict().items():
        assert torch.equal(ck["model"][k], v)
    assert ck["extra"] == {"epoch": 1, "metrics": {"top1": 0.5}}
    ref = opt.state_dict()
    assert ck["optimizer"]["param_groups"] == ref["param_groups"]
    for idx, per in ref["state"].items():
        for name, value in per.items():
            assert torch.equal(ck["optimizer"]["state"][idx][name], value)


def test_resume_continues_exactly(tmp_path):
    storage = Storage()
    # uninterrupted: 4 + 4 steps
    model, opt, sched = _setup()
    _steps(model, opt, sched, 4, seed=1)
    save_checkpoint(
        storage,
        str(tmp_path / "c"),
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
    )
    straight = copy.deepcopy(model)
    s_opt = torch.optim.AdamW(straight.parameters(), lr=1e-2, weight_decay=0.05)
    s_opt.load_state_dict(opt.state_dict())
    _steps(model, opt, sched, 4, seed=2)
    # resumed: fresh objects, loaded from the checkpoint, then the same 4 steps
    model2, opt2, sched2 = _setup(seed=99)
    ck = load_checkpoint(storage, str(tmp_path / "c"))
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["optimizer"])
    sched2.load_state_dict(ck["scheduler"])
    _steps(model2, opt2, sched2, 4, seed=2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_incomplete_checkpoint_is_refused(tmp_path):
    storage = Storage()
    model, *_ = _setup()
    save_checkpoint(storage, str(tmp_path / "c"), model=model.state_dict())
    (tmp_path / "c" / "state.json").unlink()  # as if the writer died before the last file
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(storage, str(tmp_path / "c"))


def test_plateau_scheduler_state_with_infinity_survives(tmp_path):
    storage = Storage()
    model, opt, _ = _setup()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=1)
    save_checkpoint(
        storage, str(tmp_path / "c"), model=model.state_dict(), scheduler=plateau.state_dict()
    )
    back = load_checkpoint(storage, str(tmp_path / "c"))["scheduler"]
    assert back["best"] == float("-inf") and back["mode"] == "max"
    torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max").load_state_dict(back)
