"""RAC (METHODS.md §8): fusion (Eq. 5), LACE with smoothing and re-weighting, self-exclusion by id, text encoders and
their truncation, memory edits without weight changes, training with the Trainer and bit-identical resume.

Everything runs on the CPU with tiny modules: a cifar_resnet8 base network, a fixed random image encoder E, an exact or
HNSW faiss memory of 24 images, a bag-of-words (or 1-layer open_clip) text encoder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.index.encoders import _word_vector, encode_texts
from pipeline.index.memory import RetrievalMemory
from pipeline.index.neighbours import Retriever, edit_memory
from pipeline.index.text import TEXT_ENCODERS, BagOfWordsEncoder, OpenClipTextEncoder, create_text_encoder
from pipeline.losses import LogitAdjustedLoss
from pipeline.models.network import Network
from pipeline.models.retrieval import RetrievalBranch, fuse_logits
from pipeline.optim import SAM
from pipeline.registry import UnknownNameError
from pipeline.train.methods.rac import RAC, precompute_texts
from pipeline.train.trainer import Trainer, TrainerConfig
from pipeline.train.updaters import SAMUpdate, StandardUpdate

C, B, N = 4, 6, 24
TEXTS = ["apple", "bear", "cloud", "dog"]
LABELS = torch.tensor([0] * 10 + [1] * 7 + [2] * 4 + [3] * 3)  # (N,) long-tailed
IDS = 1000 + np.arange(N)  # sample ids differ from row positions
SMALL_CLIP = {"width": 32, "layers": 1, "heads": 2}
EOT = 49407


# --- fusion -------------------------------------------------------------------------------------------------------
def test_fuse_logits_by_hand() -> None:
    f_base = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])  # row norms 5, 2
    f_ret = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])  # row norms 5, 1
    # L/2 = 1.5: 1.5 * ([0, 0, 1] + [0.6, 0.8, 0]) and 1.5 * ([1, 0, 0] + [0, 0, 1])
    expected = torch.tensor([[0.9, 1.2, 1.5], [1.5, 0.0, 1.5]])
    torch.testing.assert_close(fuse_logits(f_base, f_ret), expected)
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 2\)"):
        fuse_logits(f_base, f_ret[:, :2])


# --- LACE -----------------------------------------------------------------------------------------------------------
COUNTS = [100, 10, 4]


def _la_batch() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0], [1.0, 1.0, -2.0], [-0.5, 2.0, 0.0]], dtype=torch.float64)
    return logits, torch.tensor([0, 2, 1, 1])


def _hand_lace(logits, target, eps=0.0, alpha=None) -> float:
    """Σ_i α_{y_i} [(1 − ε)(−log p_{i,y_i}) + ε/C Σ_c α_c/α_{y_i}·(−log p_{i,c})] / Σ_i α_{y_i}, p on z + log π."""
    total = sum(COUNTS)
    alpha = alpha or [1.0] * len(COUNTS)
    num = den = 0.0
    for row, y in zip(logits.tolist(), target.tolist(), strict=True):
        z = [v + math.log(n / total + 1e-12) for v, n in zip(row, COUNTS, strict=True)]
        lse = math.log(sum(math.exp(v) for v in z))
        nll = [lse - v for v in z]
        num += (1 - eps) * alpha[y] * nll[y] + eps / len(z) * sum(a * v for a, v in zip(alpha, nll, strict=True))
        den += alpha[y]
    return num / den


def test_lace_defaults_are_todays_loss_and_tau0_is_ce() -> None:
    logits, target = _la_batch()
    prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    z = logits.float()
    today = F.cross_entropy(z + torch.log(prior**1.0 + 1e-12).float(), target)  # the loss before RAC's options
    assert torch.equal(LogitAdjustedLoss(COUNTS)(z, target), today)
    assert torch.equal(LogitAdjustedLoss(COUNTS, label_smoothing=0.0, reweight="none")(z, target), today)
    assert LogitAdjustedLoss(COUNTS)(logits, target).item() == pytest.approx(_hand_lace(logits, target), rel=1e-6)
    torch.testing.assert_close(LogitAdjustedLoss(COUNTS, tau=0.0)(logits, target), F.cross_entropy(logits, target))


def test_lace_label_smoothing_by_hand() -> None:
    logits, target = _la_batch()
    loss = LogitAdjustedLoss(COUNTS, label_smoothing=0.1)(logits, target)
    assert loss.item() == pytest.approx(_hand_lace(logits, target, eps=0.1), rel=1e-6)
    assert loss.item() != pytest.approx(_hand_lace(logits, target), rel=1e-3)
    with pytest.raises(ValueError, match="label_smoothing=1.0"):
        LogitAdjustedLoss(COUNTS, label_smoothing=1.0)


@pytest.mark.parametrize("reweight", ["inv_sqrt", "inv_log"])
def test_lace_reweight_by_hand(reweight: str) -> None:
    logits, target = _la_batch()
    raw = [1 / math.sqrt(n) if reweight == "inv_sqrt" else 1 / math.log(n) for n in COUNTS]
    alpha = [a * len(raw) / sum(raw) for a in raw]  # normalised to mean 1
    loss = LogitAdjustedLoss(COUNTS, label_smoothing=0.1, reweight=reweight)
    torch.testing.assert_close(loss.class_weight.double(), torch.tensor(alpha, dtype=torch.float64))
    assert loss(logits, target).item() == pytest.approx(_hand_lace(logits, target, 0.1, alpha), rel=1e-6)
    # a per-class weight given to forward multiplies α elementwise
    w = [1.0, 3.0, 0.5]
    combined = [a * b for a, b in zip(alpha, w, strict=True)]
    value = loss(logits, target, weight=torch.tensor(w)).item()
    assert value == pytest.approx(_hand_lace(logits, target, 0.1, combined), rel=1e-6)


def test_lace_reweight_errors() -> None:
    with pytest.raises(ValueError, match="unknown reweight 'sqrt'; valid choices: none, inv_sqrt, inv_log"):
        LogitAdjustedLoss(COUNTS, reweight="sqrt")
    with pytest.raises(ValueError, match=r"classes \[1\] have counts \[1\]"):
        LogitAdjustedLoss([5, 1, 3], reweight="inv_log")


# --- retrieval: self-exclusion by id, k checks, texts -------------------------------------------------------------
def _memory(vectors, ids, labels, kind: str, metric: str = "l2") -> RetrievalMemory:
    return RetrievalMemory.build(
        np.asarray(vectors, dtype=np.float32), np.asarray(ids), np.asarray(labels), TEXTS, kind=kind, metric=metric
    )


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_self_match_dropped_by_id_duplicate_under_other_id_kept(kind: str) -> None:
    # id 10 is the query's own entry; id 11 is the same image stored under another id (a legitimate neighbour)
    mem = _memory([[0, 0], [0, 0], [1, 0], [2, 0], [5, 0]], [10, 11, 12, 13, 14], [0, 1, 2, 3, 0], kind)
    r = Retriever(mem, k=2)
    q = np.zeros((1, 2), dtype=np.float32)
    assert r.neighbours(q, query_ids=np.array([10])).tolist() == [[1, 2]]
    assert sorted(r.neighbours(q)[0].tolist()) == [0, 1]  # without exclusion the query finds itself
    # the excluded entry need not rank first: query at (0, 0) with id 12 (its own entry ranks third)
    r3 = Retriever(mem, k=3)
    labels = r3.neighbours(q, query_ids=np.array([12]))[0].tolist()
    assert sorted(labels[:2]) == [0, 1] and labels[2] == 3
    # a query id that is not in the memory (validation image) excludes nothing
    assert sorted(r.neighbours(q, query_ids=np.array([99]))[0].tolist()) == [0, 1]


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_id_stored_twice_is_dropped_twice(kind: str) -> None:
    mem = _memory([[0, 0], [0.1, 0], [1, 0], [2, 0]], [10, 10, 12, 13], [0, 0, 2, 3], kind)
    r = Retriever(mem, k=2)
    q = np.array([[0.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    assert r.neighbours(q, query_ids=np.array([10, 13])).tolist() == [[2, 3], [2, 0]]
    # k = 3 leaves 4 − 2 entries for query id 10: an error naming k and the size
    with pytest.raises(ValueError, match=r"k=3 exceeds the memory size 4 minus the 2 entries"):
        Retriever(mem, k=3).neighbours(q, query_ids=np.array([10, 13]))
    assert Retriever(mem, k=3).neighbours(q, query_ids=np.array([12, 13])).shape == (2, 3)


def test_k_larger_than_memory_raises() -> None:
    mem = _memory([[0, 0], [1, 0], [2, 0], [3, 0]], [1, 2, 3, 4], [0, 1, 2, 3], "exact")
    with pytest.raises(ValueError, match=r"k=5 must be in \[1, memory size 4\]"):
        Retriever(mem, k=5)
    with pytest.raises(ValueError, match="k=4 exceeds the memory size 4 minus the 1 entries"):
        Retriever(mem, k=4).neighbours(np.zeros((1, 2)), query_ids=np.array([1]))


def test_texts_join_neighbour_class_texts_in_rank_order() -> None:
    mem = _memory([[0, 0], [1, 0], [2, 0], [3, 0]], [1, 2, 3, 4], [0, 1, 2, 3], "exact")
    r = Retriever(mem, k=2)
    assert r.texts(np.array([[1, 2], [3, 0]])) == ["bear cloud", "dog apple"]
    assert r.texts(r.neighbours(np.array([[2.9, 0.0]]))) == ["dog cloud"]
    with pytest.raises(ValueError, match="4 class texts"):
        r.texts(np.array([[4, 0]]))


def test_edit_memory_removes_and_adds_and_keeps_the_original() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(12, 5)).astype(np.float32)
    mem = RetrievalMemory.build(
        vecs, np.arange(12), np.arange(12) % 4, TEXTS, kind="hnsw", metric="cosine", M=16, ef_search=64
    )
    removed = edit_memory(mem, remove_classes=[0], remove_ids=[5])
    assert len(mem) == 12 and sorted(mem.labels.tolist()) == sorted((np.arange(12) % 4).tolist())
    assert removed.ids.tolist() == [1, 2, 3, 6, 7, 9, 10, 11] and 0 not in removed.labels
    assert (removed.kind, removed.metric, removed.texts) == ("hnsw", "cosine", TEXTS)
    assert removed.index.hnsw.nb_neighbors(1) == 16 and removed.index.hnsw.efSearch == 64
    torch.testing.assert_close(removed.index.reconstruct_n(0, 8), mem.index.reconstruct_n(0, 12)[removed.ids])
    new = rng.normal(size=(2, 5)).astype(np.float32)
    added = edit_memory(mem, add_vectors=new, add_ids=[100, 101], add_labels=[3, 3])
    assert len(added) == 14 and added.search(new, 1)[1][:, 0].tolist() == [100, 101]
    with pytest.raises(ValueError, match="go together"):
        edit_memory(mem, add_vectors=new)
    with pytest.raises(ValueError, match="4 class texts"):
        edit_memory(mem, add_vectors=new, add_ids=[100, 101], add_labels=[3, 7])


# --- text encoders ------------------------------------------------------------------------------------------------
def test_bag_of_words_by_hand_and_truncation() -> None:
    enc = BagOfWordsEncoder(dim=8, seed=3)
    assert enc.context_length == 76 and not enc.pretrained and not list(enc.parameters())
    out = enc(["Red fox", "fox"])
    hand = (_word_vector("red", 8, 3) + _word_vector("fox", 8, 3)) / 2
    torch.testing.assert_close(out[0], torch.from_numpy(hand).float())
    torch.testing.assert_close(out, encode_texts(["Red fox", "fox"], dim=8, seed=3))
    assert enc.calls == 1 and out.shape == (2, 8)
    words = [f"w{i}" for i in range(76)]
    base = " ".join(words)
    a, b, c = enc([base, base + " extra words here", " ".join(words[:75] + ["other"])])
    torch.testing.assert_close(a, b)  # words beyond 76 have no effect
    assert not torch.allclose(a, c)  # the 76th word counts
    assert enc.truncate("A b " + base) == " ".join(["a", "b"] + words[:74])


def test_open_clip_text_encoder_truncates_at_77_keeping_eot() -> None:
    enc = create_text_encoder("open_clip", text_cfg=SMALL_CLIP)
    assert isinstance(enc, OpenClipTextEncoder) and not enc.pretrained and enc.context_length == 76
    long = " ".join(["cat"] * 100)
    tokens = enc.tokenize([long, "a cat"])
    assert tokens.shape == (2, 77) and tokens[0, -1] == EOT and tokens[0, 0] == 49406
    assert len(enc.tokenizer.encode(enc.truncate(long))) == 75
    out = enc([long + " dog", long + " bird", enc.truncate(long), "a cat", "a dog"])
    assert out.shape == (5, enc.dim) and enc.calls == 1
    torch.testing.assert_close(out[0], out[1])  # beyond the context: no effect
    torch.testing.assert_close(out[0], out[2])  # truncate() is exactly what the tower sees
    assert not torch.allclose(out[3], out[4])
    # random towers train by default; a frozen one has no trainable weights and stays in eval mode
    assert all(p.requires_grad for p in enc.parameters())
    frozen = OpenClipTextEncoder(text_cfg=SMALL_CLIP, trainable=False).train()
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.tower.training
    # seeded and without touching the global RNG
    state = torch.random.get_rng_state()
    again = OpenClipTextEncoder(text_cfg=SMALL_CLIP)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in enc.state_dict().items())


def test_text_encoder_registry_and_offline_pretrained() -> None:
    assert TEXT_ENCODERS.names() == ["bow", "open_clip"]
    with pytest.raises(UnknownNameError, match="bow, open_clip"):
        create_text_encoder("glove")
    with pytest.raises(RuntimeError, match="cannot be downloaded offline"):
        OpenClipTextEncoder(pretrained="openai")


# --- the RAC method -----------------------------------------------------------------------------------------------
class _Encoder(nn.Module):
    """A fixed random image encoder E: pooled colours (B, 12) → (B, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, 16, 16, generator=g) + LABELS.view(-1, 1, 1, 1).float()  # class-dependent


def _features(encoder: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return encoder(x).numpy()


def _rac(precomputed: bool = True, k: int = 3, text_encoder: nn.Module | None = None) -> RAC:
    torch.manual_seed(0)
    spec = {"backbone": {"name": "cifar_resnet8"}, "head": {"name": "linear"}, "num_classes": C}
    network, encoder = Network(spec), _Encoder()
    branch = RetrievalBranch(text_encoder or BagOfWordsEncoder(dim=16), C)
    feats = _features(encoder, _images())
    memory = RetrievalMemory.build(feats, IDS, LABELS.numpy(), TEXTS, kind="exact", metric="cosine")
    retriever = Retriever(memory, k=k)
    texts = precompute_texts(retriever, feats, IDS) if precomputed else None
    loss = LogitAdjustedLoss(torch.bincount(LABELS).tolist(), label_smoothing=0.1)
    return RAC(network, branch, encoder, retriever, loss, train_texts=texts, train_ids=IDS)


def _loader() -> list[dict]:
    x, order = _images(), torch.randperm(N, generator=torch.Generator().manual_seed(1))
    return [{"images": [x[i]], "labels": LABELS[i], "index": i} for i in order.split(B)]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"state tensor {k!r} differs"


def test_rac_prepare_batch_texts_exclude_self_and_match_on_the_fly() -> None:
    method = _rac()
    batch = _loader()[0]
    texts = method.prepare_batch(batch)["texts"]
    assert texts == _rac(precomputed=False).prepare_batch(batch)["texts"]  # same (un-augmented) images, same texts
    # each text holds k class names of neighbours other than the query's own entry
    retr = method.retriever
    feats = _features(method.encoder, batch["images"][0])
    _, ids, _ = retr.memory.search(feats, 3 + 1)
    own = IDS[batch["index"].numpy()]
    for row, text in enumerate(texts):
        kept = [i for i in ids[row] if i != own[row]][:3]
        assert text == " ".join(TEXTS[int(LABELS[int(i) - 1000])] for i in kept)


def test_rac_encoder_frozen_and_outside_the_optimizer() -> None:
    method = _rac().train()
    assert method.network.training and not method.encoder.training
    assert not any(p.requires_grad for p in method.encoder.parameters())
    ids = {id(p) for g in method.param_groups() for p in g["params"]}
    assert ids == {id(p) for m in (method.network, method.branch) for p in m.parameters()}
    assert method.head_names == ("fused", "base", "retrieval") and method.export() is method.network


def test_rac_one_text_encoder_call_per_training_step() -> None:
    method = _rac(text_encoder=OpenClipTextEncoder(text_cfg=SMALL_CLIP)).train()
    batch = method.prepare_batch(_loader()[0])
    enc = method.branch.text_encoder
    enc.calls = 0
    out = method.training_step(batch)
    assert enc.calls == 1
    f_base = method.network(batch["images"][0])
    f_ret = method.branch.fc(enc(batch["texts"]))
    torch.testing.assert_close(out.logits, fuse_logits(f_base, f_ret))
    torch.testing.assert_close(out.loss, method.loss(out.logits, batch["labels"]))
    out.loss.backward()
    assert method.branch.text_encoder.tower.token_embedding.weight.grad is not None  # T is trained
    # SAM: two training_step passes on the same prepared texts, one text-encoder call each
    method = _rac()
    enc = method.branch.text_encoder
    opt = SAM(method.param_groups(), torch.optim.SGD, rho=0.05, lr=0.1)
    batch = method.prepare_batch(_loader()[0])
    SAMUpdate(lambda e: 0.05).update(method, lambda: method.training_step(batch), opt)
    assert enc.calls == 2


def test_memory_change_alters_predictions_not_weights() -> None:
    method = _rac().eval()
    x = _images()
    before_state, before = _state(method), method.predict(x)
    assert list(before) == ["fused", "base", "retrieval"] and all(v.shape == (N, C) for v in before.values())
    memory = method.retriever.memory
    for edited in (
        edit_memory(memory, remove_classes=[0]),
        edit_memory(
            memory, add_vectors=_features(method.encoder, x[:6]), add_ids=2000 + np.arange(6), add_labels=[3] * 6
        ),
    ):
        method.set_retriever(Retriever(edited, k=3))
        after = method.predict(x)
        torch.testing.assert_close(after["base"], before["base"])
        assert not torch.allclose(after["retrieval"], before["retrieval"])
        assert not torch.allclose(after["fused"], before["fused"])
        _assert_same_state(_state(method), before_state)
    assert len(memory) == N  # the original memory is unchanged


def _trainer(method: RAC, epochs: int, updater=None, **cfg: object) -> Trainer:
    opt = torch.optim.SGD(method.param_groups(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    config = TrainerConfig(epochs=epochs, lr_schedule=lambda e: 0.05, amp="off", seed=3, **cfg)
    return Trainer(method, updater or StandardUpdate(), opt, _loader(), config, device="cpu")


def test_rac_trains_with_the_trainer() -> None:
    method = _rac()
    start = _state(method)
    history = _trainer(method, epochs=3).fit()
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    end = _state(method)
    for name in ("network.head.weight", "branch.fc.weight"):
        assert not torch.equal(start[name], end[name]), name
    for name in ("encoder.fc.weight", "encoder.fc.bias"):
        assert torch.equal(start[name], end[name]), name


@pytest.mark.parametrize("precomputed", [True, False])
def test_rac_resumed_run_is_bit_identical(tmp_path: Path, precomputed: bool) -> None:
    full = _rac(precomputed)
    _trainer(full, epochs=2).fit()
    ckpt = tmp_path / "checkpoint.pt"
    cut = _trainer(_rac(precomputed), epochs=2, checkpoint_path=ckpt, config_hash="rac", stop_after_epochs=1)
    cut.fit()
    assert not cut.finished
    resumed = _trainer(_rac(precomputed), epochs=2, checkpoint_path=ckpt, config_hash="rac")
    resumed.fit()
    assert resumed.start_epoch == 1 and resumed.finished
    _assert_same_state(full.state_dict(), resumed.method.state_dict())
