"""Backbone training options: drop path (stochastic depth) reaches timm and Hugging Face
models at the configured rate, activation checkpointing changes memory, not results, and a
backbone without either refuses it naming the config key."""

from __future__ import annotations

import copy

import pytest
import torch
from raylens.models.backbones import create_backbone
from raylens.models.classifier import build_model
from raylens.schema import ModelConfig
from timm.layers import DropPath

from tests.modelgen import tiny_hf


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-opts")
    tiny_hf("clip", root / "clip")
    tiny_hf("dinov3", root / "dinov3")
    return {k: f"hf:{root / k}" for k in ("clip", "dinov3")}


def test_timm_vit_gets_drop_path_up_to_the_rate():
    model = build_model(ModelConfig(backbone="test_vit", drop_path_rate=0.1), 3)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    # timm's linear ramp over the blocks: 0 first, the configured rate last
    assert rates and max(rates) == pytest.approx(0.1) and rates == sorted(rates)
    plain = build_model(ModelConfig(backbone="test_vit"), 3)
    assert not any(isinstance(m, DropPath) for m in plain.modules())


def test_hf_drop_path_goes_to_its_config(hf):
    bb = create_backbone(hf["dinov3"], drop_path_rate=0.2)
    assert bb.net.config.drop_path_rate == pytest.approx(0.2)
    rates = [m.drop_prob for m in bb.net.modules() if hasattr(m, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.2)


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.train()
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("name,size", [("test_vit", 160), ("clip", 32)])
@pytest.mark.parametrize("unfreeze", ["all", 1])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(name, size, unfreeze, hf):
    name = hf.get(name, name)
    torch.manual_seed(0)
    off = build_model(ModelConfig(backbone=name, unfreeze_last_n=unfreeze), 3)
    on = build_model(
        ModelConfig(backbone=name, unfreeze_last_n=unfreeze, grad_checkpointing=True), 3
    )
    on.load_state_dict(copy.deepcopy(off.state_dict()))
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    loss_off, g_off = _loss_and_grads(off, x, y)
    loss_on, g_on = _loss_and_grads(on, x, y)
    assert loss_on == pytest.approx(loss_off, abs=1e-6)
    # frozen early blocks: the trainable blocks still get every gradient
    assert g_on.keys() == g_off.keys() and len(g_on) > 2
    for n in g_off:
        torch.testing.assert_close(g_on[n], g_off[n], atol=1e-6, rtol=1e-5, msg=n)
    # checkpointing is actually on: the blocks' activations are recomputed
    net = on.backbone.net
    assert getattr(net, "grad_checkpointing", None) or getattr(
        getattr(net, "encoder", None), "gradient_checkpointing", None
    )


def test_backbones_without_the_option_refuse_it(hf):
    with pytest.raises(ValueError, match=r"'model.drop_path_rate': registered backbone 'vgg_s8'"):
        build_model(ModelConfig(backbone="vgg_s8", drop_path_rate=0.1), 3)
    with pytest.raises(ValueError, match=r"'model.grad_checkpointing': registered backbone"):
        build_model(ModelConfig(backbone="vgg_s8", grad_checkpointing=True), 3)
    with pytest.raises(ValueError, match=r"'model.drop_path_rate': .*clip.* no drop path"):
        create_backbone(hf["clip"], drop_path_rate=0.1)
    with pytest.raises(ValueError, match=r"'model.drop_path_rate': timm model 'vgg11'"):
        create_backbone("vgg11", drop_path_rate=0.1)
    build_model(ModelConfig(backbone="vgg_s8"), 3)  # the defaults are accepted
