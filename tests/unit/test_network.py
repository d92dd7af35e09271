"""The exported network and the CIFAR backbones (METHODS.md §2.1): save/load, errors, ResNet-32's size and shortcuts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from pipeline.models.backbones import CIFAR_MEAN, CIFAR_STD, CifarResNet, _BasicBlock, create_backbone
from pipeline.models.network import Network, create_network, load_network, save_network
from pipeline.registry import UnknownNameError

C = 10


def _spec(**kw: object) -> dict:
    spec = {
        "backbone": {"name": "cifar_resnet8"},
        "neck": {"dim": 16},
        "head": {"name": "cosine"},
        "normalize_features": True,
        "num_classes": C,
    }
    spec.update(kw)
    return spec


def _trained_looking(net: Network) -> Network:
    """Move the BN running statistics away from their init so that the round trip must carry the buffers."""
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 16, 16) * 3 + 1)
    return net.eval()


def test_save_load_round_trip_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _trained_looking(create_network(_spec()))
    save_network(net, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.pt"]  # no temporary files
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    assert spec["feature_dim"] == 16 and spec["head"] == {"name": "cosine"} and spec["num_classes"] == C
    torch.manual_seed(1)  # a different init: everything must come from the files
    loaded = load_network(tmp_path / "m")
    assert not loaded.training
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
        assert torch.equal(loaded.forward_features(x), net.forward_features(x))
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_uses_weights_only(tmp_path: Path) -> None:
    """A model.pt that would need arbitrary unpickling is refused (weights_only=True)."""
    net = create_network(_spec())
    save_network(net, tmp_path)
    state = net.state_dict()
    state["payload"] = _Evil()
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"refused to load .*model\.pt: it holds pickled objects.*GLOBAL"):
        load_network(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_calls_torch_load_with_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_network(create_network(_spec()), tmp_path)
    seen: list[dict] = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_network(tmp_path)
    assert seen and all(kw.get("weights_only") is True for kw in seen)


@pytest.mark.parametrize("missing", ["model.json", "model.pt"])
def test_missing_files_name_the_file(tmp_path: Path, missing: str) -> None:
    save_network(create_network(_spec()), tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")) as err:
        load_network(tmp_path)
    assert str(tmp_path / missing) in str(err.value)


def test_feature_pipeline() -> None:
    torch.manual_seed(0)
    net = create_network(_spec()).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        f = net.forward_features(x)
        assert f.shape == (3, 16) and torch.allclose(f.norm(dim=1), torch.ones(3))
        assert torch.equal(net(x), net.forward_head(f))
    plain = create_network(_spec(neck=None, normalize_features=False, head={"name": "linear"}))
    assert plain.neck is None and plain.feature_dim == 64 and plain.head.in_features == 64


def test_unknown_backbone_raises_unknown_name_error() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown backbone 'cifar_resnet33'.*cifar_resnet32"):
        create_backbone("cifar_resnet33")
    with pytest.raises(UnknownNameError):
        Network(_spec(backbone={"name": "cifar_resnet33"}))


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_cifar_resnet32_size_matches_ldam() -> None:
    """LDAM-DRW's ResNet-32 for CIFAR-10: 464,154 parameters (463,504 without the 64x10+10 linear head)."""
    backbone = create_backbone("cifar_resnet32")
    assert isinstance(backbone, CifarResNet) and backbone.num_features == 64
    assert _n_params(backbone) == 463_504
    assert _n_params(timm.create_model("cifar_resnet32", num_classes=C)) == 464_154
    net = Network({"backbone": {"name": "cifar_resnet32"}, "head": {"name": "linear"}, "num_classes": C})
    assert _n_params(net) == 464_154
    blocks = [m for m in backbone.modules() if isinstance(m, _BasicBlock)]
    assert len(blocks) == 15  # 3 stages x 5 blocks
    assert _n_params(create_backbone("cifar_resnet8")) == 74_640  # 464 (stem) + 4,672 + 13,952 + 55,552


def test_option_a_shortcuts_have_no_parameters() -> None:
    backbone = create_backbone("cifar_resnet32")
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 15 * 2  # stem + two per block: no 1x1 projection shortcuts
    for block in (m for m in backbone.modules() if isinstance(m, _BasicBlock)):
        assert {n.split(".")[0] for n, _ in block.named_parameters()} == {"conv1", "bn1", "conv2", "bn2"}
    # the first block of stage 2: x[:, :, ::2, ::2] zero-padded by planes // 4 = 8 channels on each side
    block = backbone.stages[5]
    assert block.conv1.stride == (2, 2) and block.pad == 8
    x = torch.randn(2, 16, 8, 8)
    s = block._shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2]) and not s[:, :8].any() and not s[:, 24:].any()


def test_cifar_resnet_forward_and_init() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("cifar_resnet32")
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 64)  # pooled features, no classifier
    w = backbone.stages[-1].conv2.weight  # kaiming_normal (fan_in, gain sqrt 2): std sqrt(2 / (64·9))
    assert abs(w.std().item() / (2 / (64 * 9)) ** 0.5 - 1) < 0.05


def test_timm_default_cfgs_are_registered() -> None:
    for name in ("cifar_resnet8", "cifar_resnet20", "cifar_resnet32"):
        assert timm.is_model(name)
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None
        assert tuple(cfg.input_size) == (3, 32, 32) and tuple(cfg.mean) == CIFAR_MEAN and tuple(cfg.std) == CIFAR_STD
        assert cfg.num_classes == C and cfg.classifier == "head"


@pytest.mark.parametrize("name", ["cifar_resnet8", "cifar_resnet20", "cifar_resnet32"])
def test_cifar_resnets_without_timm_equal_timm_s(name: str) -> None:
    """``create_backbone`` builds the CIFAR ResNets without timm (a stage that trains one never imports it): same
    weights for the same seed as ``timm.create_model(name, num_classes=0)``, same preprocessing config."""
    torch.manual_seed(3)
    direct = create_backbone(name)
    torch.manual_seed(3)
    via_timm = timm.create_model(name, num_classes=0)
    assert type(direct) is type(via_timm)
    a, b = direct.state_dict(), via_timm.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("input_size", "mean", "std", "first_conv", "classifier"):
        assert tuple(direct.pretrained_cfg[key]) == tuple(via_timm.pretrained_cfg[key]) if isinstance(
            direct.pretrained_cfg[key], tuple) else direct.pretrained_cfg[key] == via_timm.pretrained_cfg[key]


def test_a_cifar_resnet_teacher_does_not_import_timm() -> None:
    """Building, training a step of and exporting a CIFAR ResNet network imports neither timm nor open_clip."""
    import subprocess
    import sys

    code = ("import sys, torch; import pipeline.build; from pipeline.models.network import Network; "
            "n = Network({'backbone': {'name': 'cifar_resnet8'}, 'head': {'name': 'linear'}, 'num_classes': 3}); "
            "n(torch.zeros(1, 3, 32, 32)).sum().backward(); "
            "print(sorted(m for m in ('timm', 'open_clip', 'faiss', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_load_does_not_need_the_pretrained_weights_again(tmp_path: Path) -> None:
    """A network initialised from a local pretrained file is rebuilt from model.pt alone.

    ``model.pt`` holds every weight, so ``load_network`` must not load the initial weights again (from the hub, or a
    ``checkpoint_file`` that downstream stages do not declare as a dependency and that may have moved).
    """
    weights = tmp_path / "init.pth"
    torch.save(timm.create_model("cifar_resnet8", num_classes=C).state_dict(), weights)
    torch.manual_seed(0)
    net = Network(
        {
            "backbone": {"name": "cifar_resnet8", "pretrained": False, "checkpoint_file": str(weights)},
            "head": {"name": "linear"},
            "num_classes": 4,
        }
    )
    net = _trained_looking(net)
    save_network(net, tmp_path / "m")
    weights.unlink()
    loaded = load_network(tmp_path / "m")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


@pytest.mark.parametrize("spec", [
    {"backbone": {"name": "cifar_resnet8"}, "head": {"name": "linear"}, "num_classes": 5},
    {"backbone": {"name": "cifar_resnet8"}, "neck": {"dim": 16}, "head": {"name": "cosine", "scale": 20.0},
     "normalize_features": True, "num_classes": 5},
    {"backbone": {"name": "deit_lt_nano_patch8_32"}, "head": {"name": "linear"}, "dist_head": {"name": "linear"},
     "num_classes": 5},
], ids=["plain", "neck_normalized", "distilled"])
def test_heads_and_features_in_one_pass_equal_the_two_passes(spec: dict) -> None:
    # the export writes logits and features from one backbone pass: they must be the very numbers of the two calls
    torch.manual_seed(0)
    net = Network(spec).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        heads, features = net.forward_heads_and_features(x)
        expected = net.forward_heads(x)
        assert heads.keys() == expected.keys()
        assert all(torch.equal(heads[k], expected[k]) for k in heads)
        assert torch.equal(features, net.forward_features(x))
