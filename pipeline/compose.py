"""Compose ``conf/`` into the ``params.yaml`` dict exactly as DVC's Hydra integration does on ``dvc exp run``.

DVC (``dvc/utils/hydra.py::compose_and_dump``) calls ``initialize_config_dir`` + ``compose(config_name, overrides)``,
resolves interpolations and overwrites ``params.yaml``. This module does the same for ``make params``, the test that
``params.yaml`` equals the composition, and the Prefect flow's overrides.

It also derives the ``reads`` section (``conf/config.yaml``: ``reads: ${longtail.reads:}``): for each stage that reads
other stages' outputs, exactly the ``data/`` paths it reads, so that ``dvc.yaml`` can list them as its deps. DVC's
templating cannot splice a list into ``deps`` nor look one entry up by another's name, so the entries come out as a
fixed number of slots (:data:`SLOTS`), unused ones repeating ``dataset`` (which every stage reads anyway). DVC's own
composition loads the same resolver through Hydra's plugin discovery (``hydra_plugins/longtail_pipeline.py`` at the
repository root, DVC's ``hydra.plugins_path``), so an entry added with ``dvc exp run -S '+students.x={...}'`` gets its
reads too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

RESOLVER = "longtail.reads"
# Deps slots per stage kind in dvc.yaml (`- data/${item.reads[i]}`): a CBD ensemble of the paper reads 4 teachers.
SLOTS = {"index": 1, "student": 4, "memory": 4, "rebalance": 1}
PAD = "dataset"


class ReadsError(ValueError):
    pass


def _model_ref(ref: str) -> str:
    """``ce`` → ``teachers/ce``; ``teachers/x``, ``students/x``, ``rebalance/x`` stay (as ``pipeline.build``)."""
    return ref if "/" in ref else f"teachers/{ref}"


def _index_reads(entry: Mapping) -> list[str]:
    enc = entry.get("encoder") or {}
    return [f"teachers/{enc['model']}"] if enc.get("type") == "teacher" else []


def _student_reads(entry: Mapping, params: Mapping) -> list[str]:
    """The outputs a trained model reads, from its ``method_args``: CBD's ``teachers``, DeiT-LT's ``teacher``, RAC's
    ``index`` (and that index's encoder)."""
    args = entry.get("method_args") or {}
    reads = [f"teachers/{n}" for n in args.get("teachers") or []]
    if args.get("teacher"):
        reads.append(_model_ref(str(args["teacher"])))
    if args.get("index"):
        reads += [f"index/{args['index']}", *_index_reads((params.get("index") or {}).get(args["index"]) or {})]
    return reads


def _slots(reads: Iterable[str], n: int, prefix: str, where: str) -> list[str]:
    """``reads`` without repeats, prefixed, padded to ``n`` with ``dataset`` (shared by every replica); beyond ``n``,
    the last slot becomes the common parent folder of the rest (a coarser but still correct dependency)."""
    reads = list(dict.fromkeys(reads))
    if len(reads) > n:
        rest = reads[n - 1:]
        parent = {r.rsplit("/", 1)[0] for r in rest}
        if len(parent) != 1 or "/" not in rest[0]:
            raise ReadsError(f"{where} reads {len(reads)} outputs ({', '.join(reads)}); dvc.yaml has {n} deps slots: "
                             f"add `- data/${{item.reads[{n}]}}` lines to its stages and raise SLOTS in "
                             "pipeline/compose.py")
        reads = [*reads[:n - 1], parent.pop()]
    return [prefix + r for r in reads] + [PAD] * (n - len(reads))


def stage_reads(params: Mapping[str, Any]) -> dict[str, dict]:
    """``{kind: {stage key: {"reads": [n paths under data/], ...}}}`` for the stages whose inputs an entry names.

    Keys are the DVC stage keys (``student@<key>``); the ``<kind>_seed`` entries (``<name>-<K>`` for each replica K of
    ``seeds.replicas``) also carry ``name`` and ``seed``, and read replica K's outputs under ``seeds/K/``.
    """
    index = params.get("index") or {}
    students, memory = params.get("students") or {}, params.get("memory") or {}
    rebalance = params.get("rebalance") or {}
    replicas = list((params.get("seeds") or {}).get("replicas") or [])

    def reads_of(kind: str, name: str) -> list[str]:
        if kind == "index":
            return _index_reads(index[name])
        if kind == "student":
            return _student_reads(students[name], params)
        if kind == "memory":
            model = memory[name]["model"]
            if model not in students:
                raise ReadsError(f"memory.{name}.model: {model!r} is not a student; students: {', '.join(students)}")
            return [f"students/{model}", *_student_reads(students[model], params)]
        return [str(rebalance[name]["model"])]

    def model(kind: str, name: str) -> dict:  # a memory edit also declares its student's params
        return {"model": memory[name]["model"]} if kind == "memory" else {}

    section = {"index": index, "student": students, "memory": memory, "rebalance": rebalance}
    out: dict[str, dict] = {}
    for kind, entries in section.items():
        if kind != "rebalance":  # the primary rebalance stage reads `data/${item.model}` straight from its entry
            out[kind] = {name: {**model(kind, name), "reads": _slots(reads_of(kind, name), SLOTS[kind], "",
                                                                     f"{kind}@{name}")}
                         for name in entries}
        out[f"{kind}_seed"] = {
            f"{name}-{k}": {"name": name, "seed": k, **model(kind, name),
                            "reads": _slots(reads_of(kind, name), SLOTS[kind], f"seeds/{k}/",
                                            f"{kind}_seed@{name}-{k}")}
            for name in entries for k in replicas}
    return out


def _resolve_reads(*, _root_: Any) -> Any:
    from omegaconf import OmegaConf

    keys = ("index", "students", "memory", "rebalance", "seeds")
    # A DictConfig, not a dict: OmegaConf.resolve (DVC's composition) cannot put a plain dict in place of the string.
    return OmegaConf.create(stage_reads({k: OmegaConf.to_container(_root_[k], resolve=True) for k in keys
                                         if k in _root_}))


def register_resolver() -> None:
    """Register ``${longtail.reads:}`` with OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(RESOLVER, _resolve_reads, replace=True)


def compose(conf_dir: str | Path = "conf", overrides: list[str] | None = None, config_name: str = "config") -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register_resolver()
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True)


def dump(params: dict[str, Any], path: str | Path = "params.yaml") -> None:
    Path(path).write_text(yaml.safe_dump(params, sort_keys=False, default_flow_style=None, width=120))


if __name__ == "__main__":
    import sys

    dump(compose(overrides=sys.argv[1:]))
