"""What every stage script shares: logging, one-line errors with a non-zero exit, the tracker, the paths."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

DATA = Path("data")
DATASET_DIR = DATA / "dataset"
CHECKPOINTS = Path("checkpoints")
SEEDS = "seeds"  # seed replica k > 0 lives under data/seeds/<k>/ and checkpoints/seeds/<k>/
# Wall times of each stage execution, one JSON file per DVC stage (``data/timings/teacher@ce.json``). Not a DVC output
# and read by no stage: a rerun that writes identical outputs then changes nothing DVC hashes (they also go to MLflow).
TIMINGS = DATA / "timings"

# Errors a user can fix from the message alone: printed as one line, exit code 2, no traceback. ValueError covers
# ConfigError and SourceError; FloatingPointError the Trainer's NonFiniteLossError (a NaN/Inf loss); UnpicklingError
# a file that torch.load(weights_only=True) refused because it holds pickled objects (which could run code).
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, FloatingPointError,
                                                 pickle.UnpicklingError)


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LONGTAIL_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing pretrained weight fails at once, not after time-outs


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse arguments and run ``main``; user errors become ``error: <message>`` on stderr and exit code 2; success
    exits 0 without the interpreter teardown (:func:`exit_without_teardown`)."""
    setup_logging()
    args = parser.parse_args()
    try:
        main(args)
    except ModuleNotFoundError as exc:  # a `python` without the project's packages (dvc run outside the venv)
        print(f"error: {exc.name or exc} is not installed for {sys.executable}: activate the project's environment "
              "(`source .venv/bin/activate`, after `make install`) and run the command again", file=sys.stderr)
        sys.exit(2)
    except _USER_ERRORS as exc:
        msg = str(exc).strip().strip('"').splitlines()[0] if str(exc).strip() else type(exc).__name__
        if msg.startswith("Caught ") and "DataLoader worker" in msg:  # the worker's error is the text's last line
            msg = str(exc).strip().splitlines()[-1].split(": ", 1)[-1]
        if isinstance(exc, pickle.UnpicklingError):  # a torch.load outside pipeline.io.load_tensors
            detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), msg)
            msg = f"refused to load a file holding pickled objects, which could run code ({detail})"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    exit_without_teardown()


def exit_without_teardown() -> None:
    """Exit 0 once every output is written, without the interpreter's teardown of torch's modules (0.5-1 s of every
    stage process, ``benchmarks/stage_overhead.py``): the exit handlers still run (logging's flush, the checkpoint
    pusher's wait, multiprocessing's join of DataLoader workers), then stdio is flushed."""
    atexit._run_exitfuncs()  # what a normal exit runs before the teardown this skips
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def name_parser(description: str, seed: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--name", required=True, help="the entry's key in its params.yaml section")
    if seed:
        add_seed_argument(parser)
    return parser


def add_seed_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--seed", type=int, default=0, metavar="K",
                        help="seed replica: 0 (default) is the primary run under data/; K > 0 (an entry of "
                             "seeds.replicas) trains every model with its seed + K under data/seeds/K/")
    return parser


def data_root(seed: int = 0) -> Path:
    """Where the stage outputs of seed replica ``seed`` live: ``data`` for the primary run, else ``data/seeds/<k>``."""
    if seed < 0:
        raise ValueError(f"--seed {seed}: a seed replica is 0 (the primary run) or an entry of seeds.replicas (> 0)")
    return DATA if seed == 0 else DATA / SEEDS / str(seed)


def checkpoint_root(seed: int = 0) -> Path:
    return CHECKPOINTS if seed == 0 else CHECKPOINTS / SEEDS / str(seed)


def stage_name(kind: str, name: str | None, seed: int = 0) -> str:
    """The DVC stage ``<kind>@<name>`` (``<kind>`` without a name), or its seed replica K ``<kind>_seed@<name>-K``
    (``<kind>_seed@K`` without a name)."""
    if seed:
        return f"{kind}_seed@{seed}" if name is None else f"{kind}_seed@{name}-{seed}"
    return kind if name is None else f"{kind}@{name}"


def timings_path(kind: str, name: str | None, seed: int = 0) -> Path:
    """``data/timings/<stage>.json``: where the stage writes its wall times (outside every DVC output)."""
    return TIMINGS / f"{stage_name(kind, name, seed)}.json"


def stage_tracker(kind: str, name: str | None, seed: int, tags: dict[str, str], run: str | None = None):
    """The MLflow run of DVC stage ``<kind>@<name>`` (``<kind>`` without a name), or of its seed replica K
    (``<kind>_seed@<name>-K``, run name ``<run>-seedK``), tagged ``seed_replica``; ``run`` defaults to
    ``<kind>-<name>``."""
    from pipeline.tracking import create_tracker

    run = run or f"{kind}-{name}"
    if seed:
        run = f"{run}-seed{seed}"
    return create_tracker(stage_name(kind, name, seed), run, {**tags, "seed_replica": str(seed)})


def build_context(seed: int = 0):
    from pipeline.build import BuildContext, load_section

    if not (DATASET_DIR / "manifest.json").is_file():
        raise FileNotFoundError(f"{DATASET_DIR}/manifest.json not found: run the dataset stage first")
    return BuildContext(dataset_dir=DATASET_DIR, data_root=data_root(seed), dataset=load_section("dataset"))


def train_stage(section: str, kind: str, args: argparse.Namespace) -> None:
    """The teacher and student stages: train ``params.yaml[section][name]`` and write ``data/<section>/<name>``."""
    from pipeline.build import load_section
    from pipeline.config import as_dict
    from pipeline.train import distributed
    from pipeline.train.run import train_and_export

    seed = args.seed
    cfg = offset_seed(load_section(section, args.name), seed)
    distributed.relaunch(cfg.nproc)  # nproc > 1 and not under torchrun: exec this same command under torchrun
    distributed.init(cfg.device)  # under torchrun: join the process group (rank 0 alone writes and logs)
    ctx = build_context(seed)
    stop = int(os.environ["LONGTAIL_STOP_AFTER_EPOCHS"]) if os.environ.get("LONGTAIL_STOP_AFTER_EPOCHS") else None
    tags = {"model": args.name, "method": cfg.method, "dataset": ctx.dataset.name}
    tracking = stage_tracker(kind, args.name, seed, tags) if distributed.is_main() else None
    try:
        with tracking or contextlib.nullcontext() as tracker:
            if tracker is not None:
                tracker.log_params(as_dict(cfg))
            train_and_export(cfg, ctx, ctx.data_root / section / args.name,
                             checkpoint_root(seed) / section / args.name, tracker, stop,
                             timings_path=timings_path(kind, args.name, seed))
    finally:
        distributed.teardown()


def offset_seed(cfg, seed: int):
    """``cfg`` with its training seed moved by the replica offset ``seed`` (a TrainConfig, or one holding ``train``)."""
    import dataclasses

    if seed == 0:
        return cfg
    if hasattr(cfg, "train"):
        return dataclasses.replace(cfg, train=offset_seed(cfg.train, seed))
    return dataclasses.replace(cfg, seed=cfg.seed + seed)
