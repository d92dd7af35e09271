"""Shared helpers of the benchmark scripts: the default dataset's build context, presets, JSON results."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.build import BuildContext, load_section, to_schema
from pipeline.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import os

    return {"nproc": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def default_context() -> BuildContext:
    """The default dataset (read-only) and ``data/`` as the root the DeiT-LT builder loads its teacher from."""
    data = ROOT / "data"
    return BuildContext(dataset_dir=data / "dataset", data_root=data,
                        dataset=load_section("dataset", params_path=ROOT / "params.yaml"))


def load_preset(name: str, **overrides) -> TrainConfig:
    """``conf/method/<name>.yaml`` validated by the schema, with ``overrides`` applied (CPU, fp32 by default)."""
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml"), resolve=True)
    raw.update({"device": "cpu", "amp": "off", **overrides})
    return to_schema(TrainConfig, raw, f"conf/method/{name}.yaml")


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path
