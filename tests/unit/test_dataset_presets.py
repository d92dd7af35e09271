"""Every dataset preset (conf/dataset/*.yaml) carries every ``DatasetConfig`` key its source reads, so that
``dvc exp run -S dataset.<key>=...`` works on each of them (Hydra refuses to override a key the composed config lacks:
``Could not override 'dataset.hflip'``), and no key the schema does not know."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from pipeline.config import DatasetConfig, parse_schema
from pipeline.data.datasets import build_longtail
from pipeline.data.sources import SOURCES

CONF = Path(__file__).resolve().parents[2] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
FIELDS = {f.name for f in dataclasses.fields(DatasetConfig)}
# Read whatever the source: the dataset's name and source, the transforms (size, normalisation, the flip).
EVERY_SOURCE = {"name", "source", "image_size", "mean", "std", "hflip"}


def keys_read(source: str) -> set[str]:
    """The ``DatasetConfig`` keys a dataset of ``source`` reads: its loader's arguments, the long-tail builder's and
    :data:`EVERY_SOURCE`."""
    loader = set(inspect.signature(SOURCES.get(source)).parameters)
    builder = set(inspect.signature(build_longtail).parameters)
    return EVERY_SOURCE | (FIELDS & (loader | builder))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_carries_every_key_its_source_reads(preset):
    raw = yaml.safe_load((CONF / "dataset" / f"{preset}.yaml").read_text())
    missing = keys_read(raw["source"]) - set(raw)
    assert not missing, f"conf/dataset/{preset}.yaml lacks {sorted(missing)}: `-S dataset.<key>=...` fails on it"
    assert set(raw) <= FIELDS, f"conf/dataset/{preset}.yaml has keys DatasetConfig lacks: {sorted(set(raw) - FIELDS)}"
    parse_schema(DatasetConfig, raw, f"conf/dataset/{preset}.yaml")  # right types


def test_hflip_override_composes_on_every_preset():
    from pipeline.compose import compose

    for preset in PRESETS:
        params = compose(CONF, [f"dataset={preset}", "dataset.hflip=false"])
        assert params["dataset"]["name"] == preset and params["dataset"]["hflip"] is False
