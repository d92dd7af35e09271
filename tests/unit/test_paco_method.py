"""PaCo training Method (METHODS.md §4.1, §9 item 8): loss assembly, purity under SAM, queue and momentum updates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import PaCoLoss
from pipeline.models.network import Network
from pipeline.optim import SAM
from pipeline.train.methods.paco import PaCo
from pipeline.train.updaters import SAMUpdate, StandardUpdate

B, K, DIM, C = 4, 8, 8, 3
COUNTS = [5, 3, 2]
M = 0.9  # a momentum far from 1 so that the EMA is visible


def _network() -> Network:
    spec = {"backbone": {"name": "cifar_resnet8"}, "neck": None, "head": {"name": "linear"}, "num_classes": C}
    return Network(spec)


def _method(seed: int = 0, **kw: object) -> PaCo:
    torch.manual_seed(seed)
    args = dict(batch_size=B, dim=DIM, queue_size=K, momentum=M, temperature=0.1, alpha=0.5)
    return PaCo(_network(), COUNTS, **{**args, **kw}).train()


def _batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(B, 3, 16, 16, generator=g), torch.randn(B, 3, 16, 16, generator=g)]
    return {"images": images, "labels": torch.tensor([0, 1, 0, 2]), "index": torch.arange(B)}


def _key_state(m: PaCo) -> dict[str, torch.Tensor]:
    state = {**m.key_backbone.state_dict(), **m.key_projection.state_dict()}
    return {k: v.clone() for k, v in state.items()}


def _buffers(m: PaCo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return m.queue.clone(), m.queue_l.clone(), m.queue_ptr.clone()


def test_construction_queue_and_key_copy() -> None:
    m = _method()
    assert m.queue.shape == (K, DIM) and m.queue_l.shape == (K,) and int(m.queue_ptr) == 0
    # official quirk: normalize(randn(K, dim), dim=0) makes the columns unit vectors, not the rows
    torch.testing.assert_close(m.queue.norm(dim=0), torch.ones(DIM))
    assert not torch.allclose(m.queue.norm(dim=1), torch.ones(K))
    assert m.queue_l.min() >= 0 and m.queue_l.max() < C
    for pk, pq in zip(m._key_params(), m._query_params(), strict=True):
        assert torch.equal(pk, pq) and not pk.requires_grad
    assert isinstance(m.network.head, torch.nn.Linear) and m.network.head.bias is not None
    assert [type(x).__name__ for x in m.projection] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert m.projection[0].in_features == 64 and m.projection[-1].out_features == DIM


def test_loss_equals_paco_loss_on_assembled_features() -> None:
    m = _method()
    batch = m.prepare_batch(_batch())
    x_q, x_k = batch["images"]
    labels = batch["labels"]
    with torch.no_grad():  # in train mode, recomputing gives the same batch-statistics outputs
        k = F.normalize(m.key_projection(m.key_backbone(x_k)), dim=1)
    torch.testing.assert_close(batch["keys"], k)
    out = m.training_step(batch)
    f = m.network.backbone(x_q)
    q = F.normalize(m.projection(f), dim=1)
    logits = m.network.head(f)
    features = torch.cat((q, k, m.queue))
    targets = torch.cat((labels, labels, m.queue_l))
    ref = PaCoLoss(COUNTS, alpha=0.5, temperature=0.1, beta=1.0, gamma=1.0)(features, targets, logits)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(out.logits, logits)
    assert set(out.parts) == {"paco"}


def test_training_step_is_pure() -> None:
    m = _method()
    batch = m.prepare_batch(_batch())
    keys_before, buffers_before = _key_state(m), _buffers(m)
    m.eval()  # eval mode: BN running statistics of the query side do not change either, so outputs must repeat
    first, second = m.training_step(batch).loss, m.training_step(batch).loss
    assert torch.equal(first, second)
    for a, b in zip(_buffers(m), buffers_before, strict=True):
        assert torch.equal(a, b)
    for name, v in _key_state(m).items():
        assert torch.equal(v, keys_before[name]), name


def test_key_encoder_gets_no_gradient_and_is_not_optimised() -> None:
    m = _method()
    m.training_step(m.prepare_batch(_batch())).loss.backward()
    assert all(p.grad is None for p in m._key_params())
    assert all(p.grad is not None for p in (*m._query_params(), *m.network.head.parameters()))
    group_ids = {id(p) for g in m.param_groups() for p in g["params"]}
    expected = {id(p) for p in (*m.network.parameters(), *m.projection.parameters())}
    assert group_ids == expected
    assert not group_ids & {id(p) for p in m._key_params()}


@pytest.mark.parametrize("use_sam", [True, False])
def test_one_ema_and_one_enqueue_per_update(use_sam: bool) -> None:
    m = _method()
    if use_sam:
        opt = SAM(m.param_groups(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        updater = SAMUpdate(rho_schedule=lambda e: 0.05)
    else:
        opt, updater = torch.optim.SGD(m.param_groups(), lr=0.1, momentum=0.9), StandardUpdate()
    updater.on_epoch_start(0, opt)
    calls = []
    labels_seen, keys_seen = [], []
    for step in range(3):
        batch = _batch(seed=10 + step)
        batch["labels"] = torch.tensor([step % C, 1, 2, 0])
        with torch.no_grad():
            batch = m.prepare_batch(batch)
        old_k = [p.clone() for p in m._key_params()]
        queue_before = _buffers(m)

        def compute_loss(b: dict = batch):
            calls.append(1)
            return m.training_step(b)

        updater.update(m, compute_loss, opt)
        # the update changed query weights but neither the queue nor the key encoder
        for a, b in zip(_buffers(m), queue_before, strict=True):
            assert torch.equal(a, b)
        for pk, ok in zip(m._key_params(), old_k, strict=True):
            assert torch.equal(pk, ok)
        m.on_after_update(step)
        # exactly one EMA with the query weights after the optimizer step
        for pk, ok, pq in zip(m._key_params(), old_k, m._query_params(), strict=True):
            torch.testing.assert_close(pk, M * ok + (1 - M) * pq)
        # exactly one enqueue of B keys
        ptr = (step * B) % K
        assert int(m.queue_ptr) == (ptr + B) % K
        torch.testing.assert_close(m.queue[ptr:ptr + B], batch["keys"])
        assert torch.equal(m.queue_l[ptr:ptr + B], batch["labels"])
        keys_seen.append(batch["keys"])
        labels_seen.append(batch["labels"])
    assert len(calls) == 3 * (2 if use_sam else 1)
    # step 2 wrapped around and overwrote step 0's slots; step 1's are still there
    torch.testing.assert_close(m.queue, torch.cat((keys_seen[2], keys_seen[1])))
    assert torch.equal(m.queue_l, torch.cat((labels_seen[2], labels_seen[1])))
    with pytest.raises(RuntimeError, match="prepare_batch"):
        m.on_after_update(3)  # nothing pending: the enqueue happens once per prepared batch


def test_ema_of_the_initial_copy_is_a_no_op() -> None:
    """The official order (EMA before the keys) differs from ours only by an EMA of identical weights at step 0."""
    m = _method()
    m.prepare_batch(_batch())
    m.on_after_update(0)  # no optimizer step: query weights unchanged
    for pk, pq in zip(m._key_params(), m._query_params(), strict=True):
        torch.testing.assert_close(pk, pq, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_restores_queue_and_pointer() -> None:
    m = _method(seed=0)
    for step in range(3):
        m.prepare_batch(_batch(seed=step))
        m.on_after_update(step)
    other = _method(seed=123)
    assert not torch.equal(other.queue, m.queue)
    other.load_state_dict(m.state_dict())
    for a, b in zip(_buffers(other), _buffers(m), strict=True):
        assert torch.equal(a, b)
    assert int(other.queue_ptr) == (3 * B) % K
    for name, v in _key_state(other).items():
        assert torch.equal(v, _key_state(m)[name]), name


def test_queue_size_must_be_a_multiple_of_batch_size() -> None:
    with pytest.raises(ValueError, match=r"queue_size=8.*batch_size=3.*drop_last"):
        _method(batch_size=3)
    m = _method()
    batch = _batch()
    batch["labels"], batch["images"] = batch["labels"][:2], [x[:2] for x in batch["images"]]
    with pytest.raises(ValueError, match="drop_last"):
        m.prepare_batch(batch)


def test_rejects_neck_single_view_and_class_mismatch() -> None:
    spec = {"backbone": {"name": "cifar_resnet8"}, "neck": {"dim": 16}, "head": {"name": "linear"}, "num_classes": C}
    with pytest.raises(ValueError, match="neck"):
        PaCo(Network(spec), COUNTS, batch_size=B, queue_size=K)
    with pytest.raises(ValueError, match="class"):
        PaCo(_network(), [1, 2], batch_size=B, queue_size=K)
    m = _method()
    batch = _batch()
    batch["images"] = batch["images"][:1]
    with pytest.raises(ValueError, match="two views"):
        m.prepare_batch(batch)


def test_predict_gives_raw_linear_logits_and_export_is_the_network() -> None:
    m = _method().eval()
    x = _batch()["images"][0]
    out = m.predict(x)
    assert list(out) == ["main"]
    with torch.no_grad():
        expected = m.network.head(m.network.backbone(x))  # no log-prior, no normalisation
    torch.testing.assert_close(out["main"], expected)
    assert m.export() is m.network
