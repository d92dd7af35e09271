"""Each stage depends on exactly the outputs it reads: a change to one teacher makes stale only that teacher, the
stages that read it and ``evaluate``.

No stage runs: every output of a copy of the repository is a placeholder file, ``dvc commit`` records them in
``dvc.lock``, and "running" a stale stage means writing new placeholder content and committing it again, until
``dvc status`` is clean. The stages listed on the way are exactly those a ``dvc repro`` would run.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import pytest
import yaml

from pipeline.compose import SLOTS, ReadsError, compose, stage_reads

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parents[2]
_version = itertools.count()


def _write_outputs(repo: Path, stages) -> None:
    """Fresh placeholder content in every output of ``stages`` (a file where the path has a suffix, else a folder)."""
    for stage in stages:
        for out in stage.outs:
            path = repo / out.def_path
            text = f"{stage.addressing} {next(_version)}\n"
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}" if path.suffix == ".json" else text)
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "out.txt").write_text(text)


def _commit(dvc_repo, stages) -> None:
    """Record ``stages``' current deps and outs in ``dvc.lock`` and the cache: ``dvc commit -f`` without the run cache,
    which ``dvc status`` does not read (a third of the time)."""
    with dvc_repo.lock:
        for stage in stages:
            stage.save(run_cache=False)
            stage.commit()
        stages[0].dvcfile.dump_stages(stages, update_pipeline=False)


def _run_stale(repo: Path) -> list[set[str]]:
    """Rounds of ``dvc status``: each round's stale stages get new outputs and are committed, until none is stale."""
    from dvc.repo import Repo

    rounds = []
    while True:
        with contextlib.chdir(repo), Repo(str(repo)) as dvc_repo:
            stale = set(dvc_repo.status())
            if not stale:
                return rounds
            assert len(rounds) < 10, rounds
            rounds.append(stale)
            stages = [s for s in dvc_repo.index.stages if s.addressing in stale]
            _write_outputs(repo, stages)
            _commit(dvc_repo, stages)


@pytest.fixture(scope="module")
def committed_repo(copy_repo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository with the default composition plus a student taught by ``focal`` alone, every output a committed
    placeholder (``dvc status`` clean)."""
    from dvc.repo import Repo

    params = compose(ROOT / "conf", ["+students.focal_kd={method: cbd, method_args: {teachers: [focal]}}"])
    repo = copy_repo(tmp_path_factory.mktemp("exact_deps"), params)
    with contextlib.chdir(repo), Repo(str(repo)) as dvc_repo:
        _write_outputs(repo, dvc_repo.index.stages)
        _commit(dvc_repo, list(dvc_repo.index.stages))
    assert _run_stale(repo) == []
    return repo


def _set_param(repo: Path, override: str) -> None:
    params = compose(ROOT / "conf", ["+students.focal_kd={method: cbd, method_args: {teachers: [focal]}}", override])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_teacher_change_reruns_only_that_teacher_what_reads_it_and_evaluate(committed_repo: Path) -> None:
    _set_param(committed_repo, "teachers.focal.epochs=7")
    rounds = _run_stale(committed_repo)
    assert rounds[0] == {"teacher@focal"}
    assert set().union(*rounds) == {"teacher@focal", "student@focal_kd", "evaluate"}


def test_a_new_ce_teacher_reaches_its_index_students_rebalances_and_memory_edits(committed_repo: Path) -> None:
    """``teachers/ce`` is read by the index, by the CBD student and by RAC (its index's encoder), by the rebalances
    of CE, and by the memory edits of RAC; not by the CBD-ENS or DeiT-LT students nor by another teacher."""
    from dvc.repo import Repo

    with contextlib.chdir(committed_repo), Repo(str(committed_repo)) as dvc_repo:
        (ce,) = [s for s in dvc_repo.index.stages if s.addressing == "teacher@ce"]
        _write_outputs(committed_repo, [ce])
        _commit(dvc_repo, [ce])
    rounds = _run_stale(committed_repo)
    assert set().union(*rounds) == {
        "index@ce", "student@cbd", "student@rac", "memory@rac-add_val", "memory@rac-drop_class9", "evaluate",
        *(f"rebalance@ce-{m}" for m in ("crt", "lws", "ncm", "tau_norm")),
    }


def test_reads_of_every_kind_and_replica() -> None:
    params = compose(ROOT / "conf", ["seeds=three"])
    reads = params["reads"]
    assert reads["index"]["ce"]["reads"] == ["teachers/ce"]
    assert reads["student"]["cbd_ens"]["reads"] == ["teachers/cbd_std", "teachers/cbd_aug", "dataset", "dataset"]
    assert reads["student"]["deit_lt"]["reads"][0] == "teachers/cb"
    assert reads["student"]["rac"]["reads"][:2] == ["index/ce", "teachers/ce"]
    assert reads["memory"]["rac-add_val"] == {"model": "rac",
                                              "reads": ["students/rac", "index/ce", "teachers/ce", "dataset"]}
    assert reads["student_seed"]["rac-2"] == {"name": "rac", "seed": 2, "reads": [
        "seeds/2/index/ce", "seeds/2/teachers/ce", "dataset", "dataset"]}
    assert reads["rebalance_seed"]["cbd_ens-crt-1"]["reads"] == ["seeds/1/students/cbd_ens"]
    for kind in ("index", "student", "memory"):
        assert set(reads[kind]) == set(params[{"student": "students"}.get(kind, kind)])
        assert all(len(e["reads"]) == SLOTS[kind] for e in reads[kind].values())
        assert set(reads[f"{kind}_seed"]) == {f"{n}-{k}" for n in reads[kind] for k in (1, 2)}


def test_more_reads_than_slots_fall_back_to_their_folder_or_fail_clearly() -> None:
    many = {"students": {"s": {"method_args": {"teachers": [f"t{i}" for i in range(6)]}}}}
    assert stage_reads(many)["student"]["s"]["reads"] == ["teachers/t0", "teachers/t1", "teachers/t2", "teachers"]
    mixed = {"index": {"i": {"encoder": {"type": "teacher", "model": "t9"}}},
             "students": {"s": {"method_args": {"teachers": ["t0", "t1", "t2"], "index": "i"}}}}
    with pytest.raises(ReadsError, match="deps slots"):
        stage_reads(mixed)


def test_dvc_yaml_has_one_deps_line_per_slot() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for kind, n in SLOTS.items():
        for stage in (kind, f"{kind}_seed"):
            if kind == "rebalance" and stage == kind:
                continue
            deps = stages[stage]["do"]["deps"]
            assert [d for d in deps if "item.reads" in d] == [f"data/${{item.reads[{i}]}}" for i in range(n)], stage
