"""Data-parallel training (``pipeline.train.distributed``) on the CPU with gloo: 2 processes against 1.

(a) the DDP-averaged gradient at step 1 (BatchNorm in eval mode) and one SAM update equal one process on the same
global batch; (b) sharded samplers: disjoint positions whose union is the single-process epoch, batch by batch;
(c) ``concat_all_gather``, the batch shuffle/unshuffle round trip and PaCo's enqueue of both ranks' keys; (d) a real
``train_and_export`` relaunched on 2 ranks (``relaunch``) matches one process within noise, rank 0 alone writing.
The multi-process tests are marked ``slow``.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pipeline.data.samplers import SAMPLERS, create_sampler
from pipeline.optim import SAM
from pipeline.train import distributed
from pipeline.train.method import Method, StepOutput
from pipeline.train.trainer import Trainer, TrainerConfig
from pipeline.train.updaters import SAMUpdate

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    port = _free_port()
    mp.spawn(_entry, args=(fn, port, *args), nprocs=WORLD, join=True)


def _entry(rank: int, fn, port: int, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init("cpu") == torch.device("cpu")
    try:
        fn(rank, *args)
    finally:
        distributed.teardown()


class _Toy(Method):
    """Linear → BatchNorm1d (kept in eval mode) → ReLU → Linear over (B, 3) inputs; cross-entropy (a batch mean)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
        self.frozen = nn.Linear(3, 2).requires_grad_(False)  # a frozen part: neither reduced nor broadcast

    def train(self, mode: bool = True) -> _Toy:
        super().train(mode)
        self.net[1].eval()  # BN statistics would differ per rank; the check uses eval-mode BN
        return self

    def training_step(self, batch: dict) -> StepOutput:
        logits = self.net(batch["images"][0])
        return StepOutput(loss=nn.functional.cross_entropy(logits, batch["labels"]), logits=logits)


def _global_batch(n: int = 8) -> dict:
    g = torch.Generator().manual_seed(5)
    return {"images": [torch.randn(n, 3, generator=g)], "labels": torch.randint(0, 2, (n,), generator=g),
            "index": torch.arange(n)}


def _local(batch: dict, rank: int) -> dict:
    """This rank's strided share of a global batch (what the sharded sampler gives it)."""
    return {"images": [batch["images"][0][rank::WORLD]], "labels": batch["labels"][rank::WORLD],
            "index": batch["index"][rank::WORLD]}


# --- (a) gradients ---------------------------------------------------------------------------------------------------
def _check_gradients(rank: int) -> None:
    torch.manual_seed(0)
    method = _Toy().train()
    ref = copy.deepcopy(method)
    batch = _global_batch()
    ddp = distributed.wrap(method, torch.device("cpu"))
    loss, _, _ = ddp(_local(batch, rank))
    loss.backward()
    ref.training_step(batch).loss.backward()
    for (name, p), q in zip(method.named_parameters(), ref.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=f"gradient of {name}")
        else:
            assert p.grad is None
    # two SAM updates through the Trainer (each pass all-reduced) == single-process SAM on the global batch
    rho = 0.05
    torch.manual_seed(0)
    method, ref = _Toy(), _Toy()
    ref.load_state_dict(method.state_dict())
    opt = SAM(method.param_groups(), torch.optim.SGD, rho=rho, lr=0.1, momentum=0.9)
    ref_opt = SAM(ref.param_groups(), torch.optim.SGD, rho=rho, lr=0.1, momentum=0.9)
    cfg = TrainerConfig(epochs=1, lr_schedule=lambda _: 0.1, amp="off")
    Trainer(method, SAMUpdate(lambda e: rho), opt, [_local(batch, rank), _local(batch, rank)], cfg).fit()
    sam = SAMUpdate(lambda e: rho)
    sam.on_epoch_start(0, ref_opt)
    ref.train()
    for _ in range(2):
        sam.update(ref, lambda: ref.training_step(batch), ref_opt)
    for (name, p), q in zip(method.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} after 2 SAM updates")


@pytest.mark.slow
def test_ddp_gradient_and_sam_update_equal_one_process_on_the_global_batch() -> None:
    _spawn(_check_gradients)


# --- (b) sharded samplers (no processes needed: the shard is a pure function of rank) --------------------------------
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sharded_sampler_ranks_partition_the_epoch(name: str) -> None:
    labels = np.repeat(np.arange(4), [40, 10, 5, 2])  # N = 57: odd, so the shards are padded
    kw = {"epoch_length": "cycle"} if name == "repeated_aug" else {}
    single = create_sampler(name, labels=labels, seed=4, num_epochs=5, **kw).configure(sample_seeds=True)
    ranks = [create_sampler(name, labels=labels, seed=4, num_epochs=5, **kw).configure(
        rank=r, world_size=WORLD, sample_seeds=True) for r in range(WORLD)]
    for epoch in (0, 3):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        full = list(single)  # (index, seed) per position of the global order
        shards = [list(s) for s in ranks]
        assert len(shards[0]) == len(shards[1]) == -(-len(full) // WORLD)  # equal epoch length on every rank
        # positions r, r + W, ...: disjoint, and together the global order, padded with its first indices (the
        # padding positions get seeds of their own); every real position keeps its single-process (index, seed)
        total = len(shards[0]) * WORLD
        by_position = {r + WORLD * i: entry for r in range(WORLD) for i, entry in enumerate(shards[r])}
        assert sorted(by_position) == list(range(total))
        assert [by_position[q] for q in range(len(full))] == full
        assert [by_position[q][0] for q in range(len(full), total)] == [i for i, _ in full[: total - len(full)]]
        # the ranks' j-th batches of 4 are the single-process j-th batch of 8
        for j in range(len(full) // 8):
            assert sorted(shards[0][4 * j:4 * j + 4] + shards[1][4 * j:4 * j + 4]) == sorted(full[8 * j:8 * j + 8])
        # deterministic per (seed, epoch)
        again = create_sampler(name, labels=labels, seed=4, num_epochs=5, **kw).configure(
            rank=1, world_size=WORLD, sample_seeds=True)
        again.set_epoch(epoch)
        assert list(again) == shards[1]


def test_sampler_configure_rejects_a_bad_rank() -> None:
    s = create_sampler("instance", labels=[0, 1], seed=0, num_epochs=1)
    with pytest.raises(ValueError, match="sampler rank 2 of world_size 2"):
        s.configure(rank=2, world_size=2)


# --- (c) collectives and PaCo ----------------------------------------------------------------------------------------
def _check_collectives(rank: int) -> None:
    from pipeline.models.network import Network
    from pipeline.train.methods.paco import PaCo

    x = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * rank  # (3, 2), different per rank
    gathered = distributed.concat_all_gather(x)
    assert torch.equal(gathered, torch.cat([torch.arange(6.0).reshape(3, 2) + 100 * r for r in range(WORLD)]))
    torch.manual_seed(rank)  # different RNG per rank: the permutation must still be rank 0's
    shuffled, idx_unshuffle = distributed.batch_shuffle(x)
    assert shuffled.shape == x.shape
    all_shuffled = distributed.concat_all_gather(shuffled)
    assert sorted(all_shuffled[:, 0].tolist()) == sorted(gathered[:, 0].tolist())  # a permutation of both batches
    assert torch.equal(distributed.batch_unshuffle(shuffled, idx_unshuffle), x)  # round trip
    # PaCo: the queue receives both ranks' keys and labels, rank 0's first
    torch.manual_seed(0)
    spec = {"backbone": {"name": "cifar_resnet8"}, "neck": None, "head": {"name": "linear"}, "num_classes": 3}
    paco = PaCo(Network(spec), [5, 3, 2], batch_size=2, dim=4, queue_size=8).train()
    g = torch.Generator().manual_seed(10 + rank)
    batch = {"images": [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)],
             "labels": torch.tensor([rank, 2]), "index": torch.arange(2)}
    keys = paco.prepare_batch(batch)["keys"]  # (2, 4): keys of this rank's images, after shuffle/unshuffle
    paco.on_after_update(0)
    all_keys = distributed.concat_all_gather(keys)
    assert torch.equal(paco.queue[:4], all_keys) and paco.queue_l[:4].tolist() == [0, 2, 1, 2]
    assert int(paco.queue_ptr) == 4


@pytest.mark.slow
def test_gather_shuffle_round_trip_and_paco_enqueue_of_both_ranks() -> None:
    _spawn(_check_collectives)


def test_single_process_collectives_are_the_identity() -> None:
    x = torch.randn(4, 3)
    state = torch.get_rng_state()
    assert distributed.concat_all_gather(x) is x
    shuffled, idx = distributed.batch_shuffle(x)
    assert shuffled is x and idx is None and distributed.batch_unshuffle(x, idx) is x
    assert torch.equal(torch.get_rng_state(), state)  # no RNG drawn: single-process PaCo is unchanged
    assert distributed.world_size() == 1 and distributed.is_main() and distributed.local_batch_size(8) == 8


def test_relaunch_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert distributed.relaunch_command(1, ["x.py"]) is None
    cmd = distributed.relaunch_command(2, ["/repo/stages/teacher.py", "--name", "ce", "--seed", "1"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[-4:] == ["--name", "ce", "--seed", "1"]  # argv kept
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", type("S", (), {"name": "stages.teacher"})(),
                        raising=False)
    assert distributed.relaunch_command(2, ["teacher.py", "--name", "ce"])[6:] == ["-m", "stages.teacher", "--name",
                                                                                    "ce"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.relaunch_command(2, ["teacher.py"]) is None  # already under torchrun


def test_sync_bn_is_refused_on_the_cpu() -> None:
    with pytest.raises(ValueError, match="sync_bn: true needs CUDA"):
        distributed.wrap(_Toy(), torch.device("cpu"), sync_bn=True)


def test_convert_sync_bn_leaves_frozen_batchnorm() -> None:
    m = _Toy()
    m.frozen_bn = nn.BatchNorm1d(5).requires_grad_(False)
    weight = m.net[1].weight
    assert distributed.convert_sync_bn(m) == 1
    assert isinstance(m.net[1], nn.SyncBatchNorm) and m.net[1].weight is weight  # the optimizer's tensors are kept
    assert type(m.frozen_bn) is nn.BatchNorm1d


def test_nproc_must_divide_the_batch(make_train_config) -> None:
    from pipeline.build import validate_names
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="x.batch_size 10 is not divisible by nproc 4"):
        validate_names(make_train_config(batch_size=10, nproc=4), "x")
    with pytest.raises(ConfigError, match="x.nproc must be >= 1"):
        validate_names(make_train_config(nproc=0), "x")


# --- (d) a real run on 2 ranks ---------------------------------------------------------------------------------------
_RUN = """
import json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from pipeline.build import BuildContext
from pipeline.config import DatasetConfig, ModelConfig, OptimizerConfig, TrainConfig
from pipeline.train import distributed
from pipeline.train.run import train_and_export

ds_dir, out, nproc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
cfg = TrainConfig(method="erm", model=ModelConfig(backbone="cifar_resnet8", head="linear"), epochs=4, batch_size=8,
                  optimizer=OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=5e-4), lr_schedule="constant",
                  sampler="instance", amp="off", device="cpu", num_workers=0, seed=3, nproc=nproc, checkpoint_every=2)
distributed.relaunch(cfg.nproc)
distributed.init(cfg.device)
ctx = BuildContext(dataset_dir=ds_dir, data_root=ds_dir.parent, dataset=DatasetConfig(image_size=16))
summary = train_and_export(cfg, ctx, out / "model", out / "ckpt")
(out / f"rank{distributed.rank()}.json").write_text(json.dumps({"world": distributed.world_size(),
                                                                 "summary": summary}))
distributed.teardown()
"""


@pytest.mark.slow
def test_two_rank_run_matches_one_process_and_only_rank_0_writes(tiny_dataset_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_RUN))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LONGTAIL_TRACKING": "off", "OMP_NUM_THREADS": "1"}
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LONGTAIL_TEST_KILL_AT"):
        env.pop(v, None)
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        proc = subprocess.run([sys.executable, str(script), str(tiny_dataset_dir), str(out), str(nproc)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ranks = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}
        assert list(ranks) == [f"rank{r}.json" for r in range(nproc)]
        assert all(r["world"] == nproc for r in ranks.values())
        assert ranks["rank0.json"]["summary"] is not None
        assert all(r["summary"] is None for name, r in ranks.items() if name != "rank0.json")  # rank 1 wrote nothing
        assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["checkpoint.pt"]  # no other rank's leftovers
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary output of another rank
        results[nproc] = ranks["rank0.json"]["summary"]
    one, two = results[1]["test"]["main"]["all"], results[2]["test"]["main"]["all"]
    assert results[2]["epochs"] == 4
    print(f"test accuracy: 1 process {one:.4f}, 2 ranks {two:.4f}")
    assert abs(one - two) <= 0.25, (one, two)  # 16 test images, 4 epochs: same ballpark (BN statistics per rank)
