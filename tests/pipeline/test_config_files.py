"""params.yaml, conf/ and dvc.yaml agree: the committed params are the composition of conf/, every stage declares
its script and exactly the params it reads, and DVC's resolved stage list matches the params' entries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.build import load_section
from pipeline.compose import compose
from pipeline.config import SCHEMAS

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parents[2]


def test_params_yaml_equals_the_composition_of_conf() -> None:
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == compose(ROOT / "conf"), "params.yaml differs from conf/: run `make params` (never edit it)"


def test_params_have_no_interpolations_left() -> None:
    assert "${" not in (ROOT / "params.yaml").read_text()


@pytest.mark.parametrize("section", ["dataset", "evaluate"])
def test_single_sections_validate(section: str) -> None:
    load_section(section, params_path=ROOT / "params.yaml")


@pytest.mark.parametrize("section", ["teachers", "students", "index", "rebalance"])
def test_every_named_entry_validates(section: str) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert section in SCHEMAS
    for name in params[section]:
        load_section(section, name, params_path=ROOT / "params.yaml")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf/dataset").glob("*.yaml")))
def test_every_dataset_preset_composes_and_validates(preset: str, tmp_path: Path) -> None:
    params = compose(ROOT / "conf", [f"dataset={preset}"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_section("dataset", params_path=tmp_path / "params.yaml")
    assert cfg.name == preset


def test_cifar_presets_take_the_imbalance_factor_override() -> None:
    for n in (10, 100):
        assert compose(ROOT / "conf", [f"dataset=cifar{n}_lt"])["dataset"]["imbalance_factor"] == 100
        assert compose(ROOT / "conf", [f"dataset=cifar{n}_lt", "dataset.imbalance_factor=50"])["dataset"][
            "imbalance_factor"] == 50


def _stages() -> dict[str, dict]:
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {s.addressing: {"cmd": s.cmd, "deps": [d.def_path for d in s.deps],
                               "params": [p for d in s.deps if hasattr(d, "params") for p in (d.params or [])]}
                for s in repo.index.stages if getattr(s, "cmd", None)}


def test_dvc_stage_list_matches_the_params_entries() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    expected = {"dataset", "evaluate", *(f"teacher@{k}" for k in params["teachers"]),
                *(f"student@{k}" for k in params["students"]), *(f"index@{k}" for k in params["index"]),
                *(f"rebalance@{k}" for k in params["rebalance"]), *(f"memory@{k}" for k in params["memory"]),
                "upper_bound"}
    out = subprocess.run([str(Path(sys.executable).parent / "dvc"), "stage", "list", "--name-only"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert set(out) == expected
    assert set(_stages()) == expected


def test_every_stage_depends_on_its_script_and_declares_only_its_params() -> None:
    for name, stage in _stages().items():
        script = stage["cmd"].split()[2].replace(".", "/") + ".py"
        assert script in stage["deps"], f"{name} does not list {script}"
        assert "stages/_cli.py" in stage["deps"] or name == "dataset" and "stages/_cli.py" in stage["deps"]
        kind, _, key = name.partition("@")
        section = {"teacher": "teachers", "student": "students", "index": "index", "rebalance": "rebalance"}.get(kind)
        if section:
            assert f"{section}.{key}" in stage["params"], f"{name} must declare {section}.{key}"
            assert not any(p.startswith(f"{section}.") and p != f"{section}.{key}" for p in stage["params"])


def test_seed_replicas_are_matrix_stages_of_their_own(copy_repo, tmp_path: Path) -> None:
    """With seeds=three every trained entry gets replicas 1 and 2: their own stage, `--seed K`, outputs under
    data/seeds/K, only their own entry's params (changing one model reruns only its replicas), and the evaluate stage
    reads them through data/seeds. The default composition has none."""
    from dvc.repo import Repo

    params = compose(ROOT / "conf", ["seeds=three"])
    repo = copy_repo(tmp_path, params)
    with Repo(str(repo)) as dvc_repo:
        stages = {s.name: s for s in dvc_repo.index.stages}
    names = {"teacher": params["teachers"], "index": params["index"], "student": params["students"],
             "rebalance": params["rebalance"], "memory": params["memory"]}
    section = {"teacher": "teachers", "index": "index", "student": "students", "rebalance": "rebalance",
               "memory": "memory"}
    replicas = {n for n in stages if "_seed@" in n}
    expected = {f"{kind}_seed@{name}-{k}" for kind, entries in names.items() for name in entries for k in (1, 2)}
    assert replicas == expected | {"upper_bound_seed@1", "upper_bound_seed@2"}
    for name in expected:
        stage = stages[name]
        kind, key = name.split("_seed@")
        entry, k = key.rsplit("-", 1)
        assert stage.cmd.endswith(f"--name {entry} --seed {k}")
        assert all(o.def_path.startswith((f"data/seeds/{k}/", f"checkpoints/seeds/{k}/")) for o in stage.outs)
        declared = [p for d in stage.deps if hasattr(d, "params") for p in (d.params or [])]
        assert f"{section[kind]}.{entry}" in declared and not any(p.startswith("seeds") for p in declared)
    assert "data/seeds" in [d.def_path for d in stages["evaluate"].deps]
    assert not any("_seed@" in n for n in _stages())  # the committed params: one seed


@pytest.mark.parametrize("n", [10, 100])
def test_paper_profile_composes_into_a_consistent_pipeline(n: int, tmp_path: Path) -> None:
    """teachers=paper_cifarN with students=paper and evaluate=paper: every name a student, a rebalance entry, an
    index or an ensemble reads is a teacher of the composition, and every entry validates."""
    params = compose(ROOT / "conf", [f"dataset=cifar{n}_lt", f"teachers=paper_cifar{n}", "students=paper",
                                     "evaluate=paper", "memory=none"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    teachers = set(params["teachers"])
    for name, student in params["students"].items():
        named = student["method_args"].get("teachers", [])
        named += [student["method_args"]["teacher"].removeprefix("teachers/")] if "teacher" in student["method_args"] \
            else []
        assert named and set(named) <= teachers, name
        load_section("students", name, params_path=tmp_path / "params.yaml")
    for entry in params["rebalance"].values():
        kind, model = entry["model"].split("/", 1)
        assert model in params[kind]
    for entry in params["index"].values():
        assert entry["encoder"]["model"] in teachers
    for members in params["evaluate"]["ensembles"].values():
        assert set(members) <= teachers
    for name in teachers:
        load_section("teachers", name, params_path=tmp_path / "params.yaml")


@pytest.mark.parametrize("overrides", [
    [],
    ["dataset=places_lt", "index=paper_vit", "students=rac_places_lt", "rebalance=none"],
    ["dataset=inat2018", "index=paper_vit", "students=rac_inat2018", "rebalance=none"],
], ids=["default", "rac_places_lt", "rac_inat2018"])
def test_every_model_a_stage_reads_is_defined(overrides: list[str]) -> None:
    """A RAC student's index, a DeiT-LT student's teacher, a memory edit's student and a rebalanced model exist."""
    params = compose(ROOT / "conf", overrides)
    for name, student in params["students"].items():
        args = student.get("method_args", {})
        if student["method"] == "rac":
            assert args["index"] in params["index"], name
        if "teacher" in args:
            kind, model = args["teacher"].split("/", 1)
            assert model in params[kind], name
        assert set(args.get("teachers", [])) <= set(params["teachers"]), name
    for entry in params["memory"].values():
        assert params["students"][entry["model"]]["method"] == "rac"
    for entry in params["rebalance"].values():
        kind, model = entry["model"].split("/", 1)
        assert model in params[kind]
    assert params["upper_bound"]["recipe"] in params["teachers"]
