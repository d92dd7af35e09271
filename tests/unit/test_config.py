"""``pipeline.config``: loading a params.yaml section validates keys, types and registry names at once.

Every error is a ``ConfigError`` whose one line names the bad key or value and lists what would be valid
(STYLE.md principle 11).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.build import load_section, to_schema
from pipeline.config import (
    ConfigError,
    DatasetConfig,
    IndexConfig,
    ModelConfig,
    RebalanceConfig,
    TrainConfig,
)

TEACHER = {
    "method": "erm",
    "model": {"backbone": "cifar_resnet8", "head": "linear"},
    "loss": "ce",
    "epochs": 2,
    "optimizer": {"lr": 0.05},
}


def _write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _teacher(tmp_path: Path, **changes: object) -> TrainConfig:
    return load_section("teachers", "ce", _write(tmp_path, {"teachers": {"ce": {**TEACHER, **changes}}}))


def test_valid_section_loads_as_dataclasses(tmp_path: Path) -> None:
    cfg = _teacher(tmp_path)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.model, ModelConfig)
    assert cfg.epochs == 2 and cfg.optimizer.lr == 0.05 and cfg.optimizer.momentum == 0.9  # defaults fill the rest
    ds = load_section("dataset", None, _write(tmp_path, {"dataset": {"source": "synthetic", "imbalance_factor": 1}}))
    assert isinstance(ds, DatasetConfig) and ds.imbalance_factor == 1.0


def test_unknown_top_level_key_names_it_and_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _teacher(tmp_path, metod="erm")
    msg = str(err.value)
    assert "teachers.ce" in msg and "'metod'" in msg
    assert "valid keys:" in msg and "method" in msg and "batch_size" in msg and "\n" not in msg


def test_unknown_nested_key_names_it_and_lists_the_nested_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _teacher(tmp_path, model={"bakbone": "cifar_resnet8"})
    msg = str(err.value)
    assert "'model.bakbone'" in msg
    valid = msg.split("valid keys:")[1]
    assert "backbone" in valid and "neck_dim" in valid and "epochs" not in valid  # ModelConfig's keys
    with pytest.raises(ConfigError, match=r"'optimizer\.lrr'.*valid keys: name, lr, momentum"):
        _teacher(tmp_path, optimizer={"lrr": 0.1})


def test_unknown_key_two_levels_down(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'train\.model\.bakbone'.*valid keys: backbone"):
        to_schema(RebalanceConfig, {"model": "teachers/ce", "train": {"model": {"bakbone": "x"}}}, "rebalance.ce-crt")
    with pytest.raises(ConfigError, match=r"'encoder\.tpye'.*valid keys: type, model, checkpoint_file"):
        to_schema(IndexConfig, {"encoder": {"tpye": "timm"}}, "index.x")


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"epochs": "ten"}, "teachers.ce.epochs"),
        ({"model": {"neck_dim": "wide"}}, "teachers.ce.model.neck_dim"),
        ({"optimizer": {"lr": "fast"}}, "teachers.ce.optimizer.lr"),
        ({"transforms": "standard"}, "teachers.ce.transforms"),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, changes: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        _teacher(tmp_path, **changes)
    assert str(err.value).startswith(key + ":")


@pytest.mark.parametrize(
    ("changes", "key", "valid"),
    [
        ({"method": "mixup"}, "method", ["erm", "cbd", "paco"]),
        ({"loss": "lda"}, "loss", ["ce", "ldam", "focal", "balanced_softmax"]),
        ({"sampler": "balanced"}, "sampler", ["instance", "class_aware", "cbd"]),
        ({"transforms": ["standard", "autoaug"]}, "transforms", ["standard", "test", "paco_query"]),
        ({"model": {"backbone": "cifar_resnet8", "head": "mlp"}}, "model.head", ["linear", "normed", "cosine", "lws"]),
        ({"lr_schedule": "onecycle"}, "lr_schedule", ["constant", "cosine", "ldam_drw"]),
        ({"updater": {"name": "asam"}}, "updater.name", ["sam", "standard"]),
        (
            {"updater": {"name": "sam", "rho_schedule": "cyclic"}},
            "updater.rho_schedule",
            ["constant", "step", "linear"],
        ),
        ({"class_weight": "inverse"}, "class_weight", ["none", "reweight", "drw"]),
        ({"optimizer": {"name": "adam"}}, "optimizer.name", ["sgd", "adamw"]),
    ],
)
def test_unknown_registry_name_lists_valid_names(tmp_path: Path, changes: dict, key: str, valid: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        _teacher(tmp_path, **changes)
    msg = str(err.value)
    assert msg.startswith(f"teachers.ce.{key}:") and "valid:" in msg
    listed = msg.split("valid:")[1]
    assert all(v in listed for v in valid), msg


def test_unknown_backbone_names_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _teacher(tmp_path, model={"backbone": "resnet_999"})
    msg = str(err.value)
    assert "teachers.ce.model.backbone" in msg and "'resnet_999'" in msg
    assert "cifar_resnet32" in msg and "timm" in msg


def test_ranges(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="teachers.ce.epochs must be >= 1, got 0"):
        _teacher(tmp_path, epochs=0)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        _teacher(tmp_path, batch_size=0)


def test_dataset_checks(tmp_path: Path) -> None:
    def load(**raw: object) -> DatasetConfig:
        return load_section("dataset", params_path=_write(tmp_path, {"dataset": raw}))

    with pytest.raises(ConfigError, match=r"dataset.imbalance_factor must be >= 1.*got 0.5"):
        load(imbalance_factor=0.5)
    with pytest.raises(ConfigError, match=r"dataset.source: unknown value 'mnist'; valid: .*synthetic"):
        load(source="mnist")
    with pytest.raises(ConfigError, match=r"dataset.profile: unknown value 'linear'; valid: exp, step, pareto, none"):
        load(profile="linear")
    with pytest.raises(ConfigError, match="few"):
        load(many=10, few=20)


def test_rebalance_checks(tmp_path: Path) -> None:
    base = {"model": "teachers/ce", "method": "crt"}
    assert to_schema(RebalanceConfig, base, "rebalance.x").train.method == "erm"
    with pytest.raises(ConfigError, match=r"rebalance.x.method: unknown value 'knn'; valid: crt, lws, ncm, tau_norm"):
        to_schema(RebalanceConfig, {**base, "method": "knn"}, "rebalance.x")
    with pytest.raises(ConfigError, match=r"ncm_feat.*valid: un, l2n, cl2n"):
        to_schema(RebalanceConfig, {**base, "ncm_feat": "raw"}, "rebalance.x")
    with pytest.raises(ConfigError, match=r"rebalance.x.model must be '<teachers\|students>/<name>', got 'ce'"):
        to_schema(RebalanceConfig, {**base, "model": "ce"}, "rebalance.x")
    with pytest.raises(ConfigError, match=r"rebalance.x.train.sampler: unknown value"):
        to_schema(RebalanceConfig, {**base, "train": {"sampler": "nope"}}, "rebalance.x")


def test_missing_named_entry_lists_defined_names(tmp_path: Path) -> None:
    path = _write(tmp_path, {"teachers": {"ce": TEACHER, "ldam": TEACHER}})
    with pytest.raises(ConfigError, match=r"teachers.focal is not in .*params.yaml; defined: ce, ldam"):
        load_section("teachers", "focal", path)
    with pytest.raises(ConfigError, match="defined: none"):
        load_section("students", "cbd", path)


def test_unknown_section_and_missing_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"teachers": {"ce": TEACHER}})
    with pytest.raises(ConfigError, match=r"unknown params section 'teacher'; valid: dataset, teachers, students"):
        load_section("teacher", "ce", path)
    with pytest.raises(ConfigError, match="not found"):
        load_section("teachers", "ce", tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        to_schema(TrainConfig, ["erm"], "teachers.ce")


def test_repository_params_yaml_is_valid() -> None:
    """The committed params.yaml loads section by section (what every stage does first)."""
    root = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, entries in params.items():
        if section in ("teachers", "students", "index", "rebalance"):
            for name in entries:
                load_section(section, name, root / "params.yaml")
        elif section in ("dataset", "evaluate"):
            load_section(section, None, root / "params.yaml")
