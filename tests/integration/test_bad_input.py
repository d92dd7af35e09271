"""Bad input to a stage: one line on stderr naming the setting or file (and the valid choices), a non-zero exit, no
partial output, and the previous good output untouched (files under data/ and checkpoints/ compared byte for byte).

Also: files that would run code when loaded (a crafted pickle in model.pt, checkpoint.pt or the CIFAR batches, an
object array in an .npz) are refused, and the marker file their payload would create never appears; a corrupt
checkpoint is ignored with a warning and training starts over, to the weights of a fresh run.

Stages run as ``python -m stages.<name>``. To keep ~30 runs cheap they are forked from one interpreter that has
imported the heavy libraries once (``_Preloaded``): each run is a fresh child executing the stage module as
``__main__`` with its own cwd, environment, stdout and stderr. ``LONGTAIL_TEST_PRELOAD=0`` runs each in a new
interpreter instead (same results, ~4 s more per run).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import select
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.compose import compose

ROOT = Path(__file__).resolve().parents[2]
STAGE_ENV = {"PYTHONPATH": str(ROOT), "LONGTAIL_TRACKING": "off", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1", "LONGTAIL_LOG_LEVEL": "WARNING"}

_SERVER = r"""
import json, os, runpy, sys, traceback
import numpy, torch, timm, yaml  # noqa: F401  the stages' heavy imports, done once
import stages._cli, pipeline.build, pipeline.train.run, pipeline.rebalance, pipeline.evaluate.report  # noqa: F401
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.path[0] = req["cwd"]
            sys.argv = [req["module"], *req["args"]]
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int | None):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class _Preloaded:
    """One interpreter with the stage libraries imported; ``run`` forks a child per stage call (see the docstring)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=ROOT, env={**os.environ, **STAGE_ENV},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._read(300) == "ready"

    def _read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"stage server gave no answer within {timeout} s"
        return self.proc.stdout.readline().strip()

    def run(self, cwd: Path, module: str, args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess:
        out, err = cwd / ".stage.stdout", cwd / ".stage.stderr"
        req = {"cwd": str(cwd), "module": f"stages.{module}", "args": list(args), "env": env, "stdout": str(out),
               "stderr": str(err)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self._read(300))
        result = subprocess.CompletedProcess([module, *args], rc, out.read_text(), err.read_text())
        out.unlink()
        err.unlink()
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_server: _Preloaded | None = None


@pytest.fixture(scope="module", autouse=True)
def _stage_server():
    yield
    global _server
    if _server is not None:
        _server.close()
        _server = None


def stage(cwd: Path, module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m stages.<module> <args>`` in ``cwd`` (INFO logs off, so stderr holds warnings and errors)."""
    global _server
    full_env = {**os.environ, **STAGE_ENV, **env}
    if os.environ.get("LONGTAIL_TEST_PRELOAD", "1") == "0":
        return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=300)
    if _server is None:
        _server = _Preloaded()
    return _server.run(cwd, module, args, full_env)


def write(cwd: Path, params: dict) -> None:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2 and stderr is exactly one line, ``error: ...``, containing every needle."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(cwd: Path) -> dict[str, str]:
    """Every file and directory under data/ and checkpoints/ with a hash of its bytes."""
    return {str(p.relative_to(cwd)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for top in ("data", "checkpoints") for p in sorted((cwd / top).rglob("*"))}


def run_edited(cwd: Path, params: dict, edit, module: str, *args: str) -> subprocess.CompletedProcess:
    """Run a stage with ``edit(copy of params)`` as params.yaml, then put the good params back."""
    bad = yaml.safe_load(yaml.safe_dump(params))
    edit(bad)
    write(cwd, bad)
    try:
        return stage(cwd, module, *args)
    finally:
        write(cwd, params)


def check_bad(cwd: Path, params: dict, edit, module: str, *args: str, needles: tuple[str, ...],
              known_debris: tuple[str, ...] = ()) -> None:
    """``run_edited`` must fail with one line holding ``needles`` and leave data/ and checkpoints/ as they were.

    ``known_debris``: paths a failing run is known to leave behind (a problem of that stage, tested on its own).
    """
    before = snapshot(cwd)
    assert_one_line_error(run_edited(cwd, params, edit, module, *args), *needles)
    after = {k: v for k, v in snapshot(cwd).items() if k in before or not k.startswith(known_debris or ("\0",))}
    assert after == before


@pytest.fixture(scope="module")
def params() -> dict:
    p = compose(ROOT / "conf")
    p["dataset"].update(source="synthetic", num_classes=4, images_per_class=30, n_max=12, val_per_class=2,
                        test_per_class=4, many=8, few=4)
    p["teachers"]["ce"].update(epochs=2, batch_size=8, device="cpu", amp="off")
    return p


@pytest.fixture(scope="module")
def with_dataset(tmp_path_factory: pytest.TempPathFactory, params: dict) -> Path:
    """A directory holding good outputs: the dataset and a trained ``teachers.ce``."""
    cwd = tmp_path_factory.mktemp("with_dataset")
    write(cwd, params)
    for args in (("dataset",), ("teacher", "--name", "ce")):
        proc = stage(cwd, *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd


@pytest.fixture(scope="module")
def fresh_weights(with_dataset: Path) -> dict[str, torch.Tensor]:
    return torch.load(with_dataset / "data/teachers/ce/model.pt", weights_only=True)


# --- the dataset stage -------------------------------------------------------------------------------------------
def _dataset(**kw: object):
    return lambda p: p["dataset"].update(**kw)


def test_missing_data_root(with_dataset: Path, params: dict, tmp_path: Path) -> None:
    check_bad(with_dataset, params, _dataset(source="cifar10", root=str(tmp_path / "nowhere")), "dataset",
              needles=("nowhere", "download=true"))


def test_missing_imagefolder_root(with_dataset: Path, params: dict, tmp_path: Path) -> None:
    check_bad(with_dataset, params, _dataset(source="imagefolder", root=str(tmp_path / "nowhere"),
                                             train_file="train.txt"), "dataset", needles=("nowhere", "root"))


def test_unknown_params_key(with_dataset: Path, params: dict) -> None:
    check_bad(with_dataset, params, lambda p: p["dataset"].update(imbalance_factr=10), "dataset",
              needles=("imbalance_factr", "imbalance_factor"))


def test_wrong_type(with_dataset: Path, params: dict) -> None:
    check_bad(with_dataset, params, _dataset(n_max="many"), "dataset", needles=("dataset.n_max", "many"))


@pytest.mark.parametrize("value", [0.5, float("nan")])
def test_imbalance_factor_below_one(with_dataset: Path, params: dict, value: float) -> None:
    check_bad(with_dataset, params, _dataset(imbalance_factor=value), "dataset", needles=("imbalance_factor", ">= 1"))


def test_a_class_left_empty(with_dataset: Path, params: dict) -> None:
    check_bad(with_dataset, params, _dataset(imbalance_factor=100.0), "dataset",
              needles=("class 2 would get 0 images", "imbalance_factor"))


def test_unknown_source_and_profile(with_dataset: Path, params: dict) -> None:
    check_bad(with_dataset, params, _dataset(source="mnist"), "dataset",
              needles=("mnist", "digits, fashion_mnist, imagefolder"))
    check_bad(with_dataset, params, _dataset(profile="zipf"), "dataset", needles=("zipf", "exp, step"))


def test_params_yaml_that_is_not_yaml(with_dataset: Path, params: dict) -> None:
    before = snapshot(with_dataset)
    (with_dataset / "params.yaml").write_text("dataset: {source: [digits\nteachers: :\n")
    try:
        proc = stage(with_dataset, "dataset")
    finally:
        write(with_dataset, params)
    assert_one_line_error(proc, "params.yaml is not valid YAML", "line")
    assert snapshot(with_dataset) == before


# --- an image folder with split files ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory, params: dict) -> tuple[Path, dict]:
    """A cwd whose dataset is an image root with split files (train counts 6, 4, 3, 2), already built."""
    from PIL import Image

    cwd = tmp_path_factory.mktemp("image_folder")
    root = cwd / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    for c, n in enumerate((6, 4, 3, 2)):
        for split, count in (("train", n), ("test", 2)):
            for i in range(count):
                name = f"{split}_{c}_{i}.png"
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name)
                lines[split].append(f"{name} {c}")
    for split, entries in lines.items():
        (root / f"{split}.txt").write_text("\n".join(entries) + "\n")
    p = yaml.safe_load(yaml.safe_dump(params))
    p["dataset"] = {"name": "folder", "source": "imagefolder", "root": str(root), "train_file": "train.txt",
                    "test_file": "test.txt", "image_size": 16, "many": 5, "few": 3}
    write(cwd, p)
    proc = stage(cwd, "dataset")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd, p


def test_malformed_split_file_line(image_folder: tuple[Path, dict]) -> None:
    cwd, p = image_folder
    split = cwd / "images/train.txt"
    good = split.read_text()
    for bad_line, needle in (("only_a_path.png", "expected 'relative/path label'"), ("x.png seven", "'seven'")):
        split.write_text(good + bad_line + "\n")
        try:
            check_bad(cwd, p, lambda q: None, "dataset", needles=("train.txt:16", needle))
        finally:
            split.write_text(good)


def test_a_class_without_training_images(image_folder: tuple[Path, dict]) -> None:
    cwd, p = image_folder
    split = cwd / "images/train.txt"
    good = split.read_text()
    split.write_text("".join(line + "\n" for line in good.splitlines() if not line.endswith(" 3")))
    try:
        check_bad(cwd, p, lambda q: None, "dataset", needles=("no training images", "'3'"))
    finally:
        split.write_text(good)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_file(image_folder: tuple[Path, dict], workers: int) -> None:
    cwd, p = image_folder
    image = cwd / "images/train_1_2.png"
    good = image.read_bytes()
    image.write_bytes(b"not a png at all")
    try:
        check_bad(cwd, p, lambda q: q["teachers"]["ce"].update(num_workers=workers), "teacher", "--name", "ce",
                  needles=("train_1_2.png", "cannot read image"))
    finally:
        image.write_bytes(good)


# --- training stages ---------------------------------------------------------------------------------------------
def _teacher(**kw: object):
    return lambda p: p["teachers"]["ce"].update(**kw)


@pytest.mark.parametrize(("key", "value", "valid"), [
    ("method", "erm_typo", "erm"), ("loss", "cross_entropy", "balanced_softmax"),
    ("sampler", "balanced_typo", "instance"),
])
def test_unknown_registry_name(with_dataset: Path, params: dict, key: str, value: str, valid: str) -> None:
    check_bad(with_dataset, params, _teacher(**{key: value}), "teacher", "--name", "ce",
              needles=(f"teachers.ce.{key}", value, valid))


def test_unknown_backbone(with_dataset: Path, params: dict) -> None:
    check_bad(with_dataset, params, lambda p: p["teachers"]["ce"]["model"].update(backbone="resnet_does_not_exist"),
              "teacher", "--name", "ce", needles=("resnet_does_not_exist", "backbone", "cifar_resnet8"))


def test_misspelled_nested_key(with_dataset: Path, params: dict) -> None:
    check_bad(with_dataset, params, lambda p: p["teachers"]["ce"]["optimizer"].update(lrr=0.1), "teacher", "--name",
              "ce", needles=("lrr", "lr, momentum"))


def test_wrong_type_in_a_teacher(with_dataset: Path, params: dict) -> None:
    check_bad(with_dataset, params, _teacher(epochs="four"), "teacher", "--name", "ce",
              needles=("teachers.ce.epochs", "four"))


def test_nan_loss(with_dataset: Path, params: dict) -> None:
    def edit(p: dict) -> None:
        p["teachers"]["diverging"] = yaml.safe_load(yaml.safe_dump(p["teachers"]["ce"]))
        p["teachers"]["diverging"]["optimizer"]["lr"] = 1e30

    check_bad(with_dataset, params, edit, "teacher", "--name", "diverging", needles=("loss", "learning rate"))


def test_index_k_larger_than_the_index(with_dataset: Path, params: dict) -> None:
    check_bad(with_dataset, params, lambda p: p["index"]["ce"].update(k=10_000), "index", "--name", "ce",
              needles=("k=10000",))


def test_student_naming_a_missing_teacher(with_dataset: Path, params: dict) -> None:
    check_bad(with_dataset, params, lambda p: p["students"]["cbd"]["method_args"].update(teachers=["nobody"]),
              "student", "--name", "cbd", needles=("teachers/nobody",))


def test_rebalance_of_an_unknown_model(with_dataset: Path, params: dict) -> None:
    name = next(iter(params["rebalance"]))
    check_bad(with_dataset, params, lambda p: p["rebalance"][name].update(model="teachers/ghost"), "rebalance",
              "--name", name, needles=("teachers/ghost",))


def test_unknown_entry_name(with_dataset: Path, params: dict) -> None:
    check_bad(with_dataset, params, lambda p: None, "teacher", "--name", "nope", needles=("teachers.nope", "ce"))


# --- checkpoints: a corrupt one is ignored, training starts over -------------------------------------------------
def _retrain_over(cwd: Path, content: bytes, fresh: dict[str, torch.Tensor]) -> str:
    ckpt = cwd / "checkpoints/teachers/ce/checkpoint.pt"
    ckpt.write_bytes(content)
    proc = stage(cwd, "teacher", "--name", "ce")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(cwd / "data/teachers/ce/model.pt", weights_only=True)
    assert got.keys() == fresh.keys() and all(torch.equal(got[k], fresh[k]) for k in fresh)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    return proc.stderr


@pytest.mark.slow
def test_corrupt_checkpoint_is_ignored_and_training_starts_over(with_dataset: Path, fresh_weights: dict) -> None:
    good = (with_dataset / "checkpoints/teachers/ce/checkpoint.pt").read_bytes()
    for content in (good[: len(good) // 2], b"", pickle.dumps([1, 2, 3]), _torch_bytes(torch.zeros(3))):
        err = _retrain_over(with_dataset, content, fresh_weights)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "checkpoint" in lines[0] and "starting over" in lines[0], err


# --- files that would run code -----------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_bytes(obj: object) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    m = tmp_path / "code-ran"
    pickle.loads(pickle.dumps(_Payload(tmp_path / "self-test")))  # the payload does run when unpickled
    assert (tmp_path / "self-test").exists()
    return m


def _swapped(cwd: Path, rel: str, content: bytes):
    """Context: ``cwd/rel`` holds ``content`` inside, its original bytes after."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        path = cwd / rel
        good = path.read_bytes()
        path.write_bytes(content)
        try:
            yield
        finally:
            path.write_bytes(good)

    return cm()


def _npz_bytes(tmp: Path, **arrays: np.ndarray) -> bytes:
    np.savez(tmp / "evil.npz", **arrays)
    return (tmp / "evil.npz").read_bytes()


# stages/rebalance.py creates checkpoints/rebalance/<name> before it loads the source model, so a run that fails
# there leaves that empty directory behind (test_failed_rebalance_leaves_no_checkpoint_dir).
REBALANCE_DEBRIS = ("checkpoints/rebalance",)


def test_model_pt_with_code_is_refused(with_dataset: Path, params: dict, marker: Path) -> None:
    name = next(iter(params["rebalance"]))
    evil = _torch_bytes({"head.weight": _Payload(marker)})
    with _swapped(with_dataset, "data/teachers/ce/model.pt", evil):
        check_bad(with_dataset, params, lambda p: p["rebalance"][name].update(model="teachers/ce"), "rebalance",
                  "--name", name, needles=("refused to load data/teachers/ce/model.pt", "GLOBAL posix.system"),
                  known_debris=REBALANCE_DEBRIS)
    assert not marker.exists()


def test_failed_rebalance_leaves_no_checkpoint_dir(with_dataset: Path, params: dict) -> None:
    name = next(iter(params["rebalance"]))
    shutil.rmtree(with_dataset / "checkpoints/rebalance", ignore_errors=True)
    with _swapped(with_dataset, "data/teachers/ce/model.pt", _torch_bytes({"head.weight": _Payload(Path("x"))})):
        check_bad(with_dataset, params, lambda p: p["rebalance"][name].update(model="teachers/ce"), "rebalance",
                  "--name", name, needles=("model.pt",))


def test_truncated_model_pt(with_dataset: Path, params: dict) -> None:
    name = next(iter(params["rebalance"]))
    good = (with_dataset / "data/teachers/ce/model.pt").read_bytes()
    with _swapped(with_dataset, "data/teachers/ce/model.pt", good[: len(good) // 2]):
        check_bad(with_dataset, params, lambda p: p["rebalance"][name].update(model="teachers/ce"), "rebalance",
                  "--name", name, needles=("data/teachers/ce/model.pt",), known_debris=REBALANCE_DEBRIS)


@pytest.mark.slow
def test_checkpoint_with_code_is_ignored(with_dataset: Path, fresh_weights: dict, marker: Path) -> None:
    err = _retrain_over(with_dataset, _torch_bytes({"epoch": 2, "method": _Payload(marker)}), fresh_weights)
    assert "ignoring unreadable checkpoint" in err and "posix.system" in err, err
    assert not marker.exists()


def test_dataset_split_with_an_object_array_is_refused(with_dataset: Path, params: dict, marker: Path,
                                                       tmp_path: Path) -> None:
    evil = _npz_bytes(tmp_path, labels=np.array([_Payload(marker)], dtype=object), ids=np.arange(1))
    with _swapped(with_dataset, "data/dataset/train.npz", evil):
        check_bad(with_dataset, params, lambda p: None, "teacher", "--name", "ce",
                  needles=("data/dataset/train.npz", "allow_pickle=False"))
    assert not marker.exists()


def test_features_with_an_object_array_are_refused(with_dataset: Path, params: dict, marker: Path,
                                                   tmp_path: Path) -> None:
    name = next(iter(params["rebalance"]))
    evil = _npz_bytes(tmp_path, train=np.array([_Payload(marker)], dtype=object))
    with _swapped(with_dataset, "data/teachers/ce/features.npz", evil):
        check_bad(with_dataset, params, lambda p: p["rebalance"][name].update(model="teachers/ce", method="ncm"),
                  "rebalance", "--name", name, needles=("allow_pickle=False",), known_debris=REBALANCE_DEBRIS)
    assert not marker.exists()


def test_predictions_with_an_object_array_are_refused(with_dataset: Path, params: dict, marker: Path,
                                                      tmp_path: Path) -> None:
    evil = _npz_bytes(tmp_path, test_labels=np.array([_Payload(marker)], dtype=object))
    with _swapped(with_dataset, "data/teachers/ce/predictions.npz", evil):
        check_bad(with_dataset, params, lambda p: None, "evaluate", needles=("allow_pickle=False",))
    assert not marker.exists()


def test_cifar_batch_with_code_is_refused(with_dataset: Path, params: dict, marker: Path, tmp_path: Path) -> None:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"]}, protocol=2))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = _Payload(marker) if name == "data_batch_1" else np.zeros((1, 3072), np.uint8)
        (base / name).write_bytes(pickle.dumps({"labels": [0], "data": data}, protocol=2))
    check_bad(with_dataset, params, _dataset(source="cifar10", root=str(tmp_path)), "dataset",
              needles=("data_batch_1", "posix.system"))
    assert not marker.exists()
