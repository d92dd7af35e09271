"""faiss retrieval memory and encoders: exact = brute force, HNSW recall, self-exclusion, save/load, errors."""

import json

import numpy as np
import pytest
import torch

from pipeline.evaluate.metrics import shot_accuracy
from pipeline.index import encoders
from pipeline.index.memory import (
    RetrievalMemory,
    build_index,
    build_memory_stats,
    knn_predict,
    knn_votes,
    recall_at_k,
    search,
)
from pipeline.registry import UnknownNameError


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2000, 32)).astype(np.float32), rng.standard_normal((50, 32)).astype(np.float32)


def test_exact_l2_equals_brute_force(data):
    db, q = data
    index = build_index(db, kind="exact", metric="l2")
    dist, ids = search(index, q, 5, metric="l2")
    d2 = ((q[:, None, :] - db[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ids, np.argsort(d2, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(d2, axis=1)[:, :5], rtol=1e-4)


def test_exact_cosine_equals_brute_force(data):
    db, q = data
    db_before = db.copy()
    index = build_index(db, kind="exact", metric="cosine")
    sims, ids = search(index, q, 5, metric="cosine")
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (db / np.linalg.norm(db, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(ids, np.argsort(-cos, axis=1)[:, :5])
    np.testing.assert_allclose(sims, -np.sort(-cos, axis=1)[:, :5], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(db, db_before)  # the caller's array is not normalised in place


def test_hnsw_recall_at_10(data):
    db, q = data
    _, exact = search(build_index(db, kind="exact", metric="cosine"), q, 10, metric="cosine")
    hnsw = build_index(db, kind="hnsw", metric="cosine", M=32, ef_construction=200, ef_search=128)
    assert hnsw.hnsw.efConstruction == 200 and hnsw.hnsw.efSearch == 128
    _, approx = search(hnsw, q, 10, metric="cosine")
    assert recall_at_k(approx, exact, 10) >= 0.9


def test_recall_at_k_by_hand():
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 4, 1]]), 2) == 0.0
    assert recall_at_k(np.array([[1, 2, 3], [5, 6, 7]]), np.array([[2, 1, 0], [5, 9, 8]]), 2) == pytest.approx(0.75)


def test_self_exclusion_by_id_with_duplicates():
    # rows 0 and 1 are identical: the self hit may rank second; it must still be dropped, the twin kept.
    db = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], dtype=np.float32)
    db_ids = np.array([10, 11, 12, 13])
    index = build_index(db, kind="exact", metric="l2")
    _, ids = search(index, db[:2], 2, metric="l2", exclude_ids=np.array([10, 11]), db_ids=db_ids)
    np.testing.assert_array_equal(ids, [[11, 13], [10, 13]])
    # a query that is not in the memory keeps its k nearest
    _, ids = search(index, db[2:3], 2, metric="l2", exclude_ids=np.array([99]), db_ids=db_ids)
    np.testing.assert_array_equal(ids, [[12, 13]])


def test_idmap_index_returns_stored_ids():
    db = np.eye(3, dtype=np.float32)
    index = build_index(db, kind="hnsw", metric="ip", ids=np.array([7, 8, 9]))
    _, ids = search(index, db, 1, metric="ip")
    np.testing.assert_array_equal(ids[:, 0], [7, 8, 9])


def test_k_too_large(data):
    db, q = data
    index = build_index(db[:5], kind="exact", metric="l2")
    with pytest.raises(ValueError, match=r"k=6 exceeds the index size 5"):
        search(index, q, 6, metric="l2")
    with pytest.raises(ValueError, match=r"k=5 \+ 1 .* index size 5"):
        search(index, q[:1], 5, metric="l2", exclude_ids=np.array([0]))


def test_bad_choices():
    with pytest.raises(ValueError, match="valid choices: exact, hnsw"):
        build_index(np.ones((2, 2)), kind="ivf", metric="l2")
    with pytest.raises(ValueError, match="valid choices: l2, ip, cosine"):
        build_index(np.ones((2, 2)), kind="exact", metric="dot")


def test_knn_vote_and_tie_break():
    labels = np.array([[2, 1, 1, 2], [0, 1, 2, 0], [3, 3, 0, 0]])
    np.testing.assert_array_equal(knn_predict(labels, 4, 4), [2, 0, 3])  # ties → nearest-first class
    np.testing.assert_array_equal(knn_predict(labels, 1, 4), [2, 0, 3])
    np.testing.assert_array_equal(knn_predict(labels, 3, 4), [1, 0, 3])
    votes = knn_votes(labels, 4, 4)
    np.testing.assert_array_equal(np.floor(votes), [[0, 2, 2, 0], [2, 1, 1, 0], [2, 0, 0, 2]])


def test_save_load_round_trip(tmp_path, data):
    db, q = data
    labels = np.arange(len(db)) % 7
    memory = RetrievalMemory.build(
        db,
        np.arange(len(db)) + 1000,
        labels,
        [f"c{i}" for i in range(7)],
        kind="hnsw",
        metric="cosine",
        M=16,
        ef_construction=64,
        ef_search=32,
    )
    before = memory.search(q, 5)
    memory.save(tmp_path / "mem")
    memory.save(tmp_path / "mem")  # overwriting an existing memory is atomic too
    loaded = RetrievalMemory.load(tmp_path / "mem")
    after = loaded.search(q, 5)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.texts == memory.texts and loaded.metric == "cosine" and loaded.kind == "hnsw"
    assert loaded.index.hnsw.efSearch == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem"]


def test_build_memory_stats():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((3, 8)) * 5
    y = np.repeat(np.arange(3), [60, 30, 10])
    feats = centers[y] + rng.standard_normal((100, 8))
    yt = np.repeat(np.arange(3), 10)
    test = centers[yt] + rng.standard_normal((30, 8))
    memory, stats, preds = build_memory_stats(
        {"features": feats, "labels": y, "ids": np.arange(100)},
        {"test": {"features": test, "labels": yt}, "val": {"features": test[:0], "labels": yt[:0]}},
        train_counts=[60, 30, 10],
        texts=["a", "b", "c"],
        kind="hnsw",
        metric="l2",
        k=5,
        many=50,
        few=20,
    )
    assert len(memory) == 100 and set(stats["splits"]) == {"train", "test"}
    assert stats["splits"]["train"]["self_excluded"] and stats["splits"]["test"]["recall_at_5"] >= 0.9
    assert stats["splits"]["test"]["knn"]["all"] > 0.9 and stats["splits"]["train"]["nn"]["all"] > 0.9
    assert preds["test/knn"].shape == (30, 3) and preds["test/nn"].shape == (30, 3) and "val/knn" not in preds
    np.testing.assert_array_equal(preds["test_labels"], yt)
    assert stats["splits"]["test"]["nn"] == shot_accuracy(preds["test/nn"], yt, [60, 30, 10], many=50, few=20)
    json.dumps(stats)
    with pytest.raises(ValueError, match="k=100 exceeds"):
        build_memory_stats(
            {"features": feats, "labels": y, "ids": np.arange(100)}, {}, train_counts=[60, 30, 10], k=100
        )


# --------------------------------------------------------------------------------------------- encoders


def test_unknown_encoder_lists_names():
    with pytest.raises(UnknownNameError, match="open_clip, teacher, timm"):
        encoders.create_encoder("dino")


def test_timm_local_file_and_offline_error(tmp_path, monkeypatch):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    enc = encoders.create_encoder("timm", model="test_resnet", checkpoint_file=tmp_path / "w.pth")
    images = np.random.default_rng(0).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
    x = enc.preprocess(images)
    assert x.shape[-2:] == enc.input_size
    feats = enc.encode(x)
    assert feats.shape == (2, enc.dim)
    with torch.no_grad():
        torch.testing.assert_close(feats, source.eval()(x))  # the local weights were loaded
    enc.train()
    assert not enc.model.training
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline.*checkpoint_file"):
        encoders.create_encoder("timm", model="test_resnet.r160_in1k")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encoders.create_encoder("timm", model="test_resnet", checkpoint_file=tmp_path / "missing.pth")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    root = tmp_path_factory.mktemp("clip")
    (root / "tiny-clip-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test", pretrained=None)
    torch.save(model.state_dict(), root / "tiny.pt")
    return model.eval(), root / "tiny.pt"


def test_open_clip_local_file_and_offline_error(tiny_clip, monkeypatch):
    model, path = tiny_clip
    enc = encoders.create_encoder("open_clip", model="tiny-clip-test", pretrained=path)
    x = enc.preprocess(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    assert x.shape == (2, 3, 32, 32) and enc.dim == 16
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(x), model.encode_image(x))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline"):
        encoders.create_encoder("open_clip", model="tiny-clip-test", pretrained="openai")


def test_encode_texts_open_clip_and_random_bow(tiny_clip):
    _, path = tiny_clip
    emb = encoders.encode_texts(["a cat", "a dog"], kind="open_clip", model="tiny-clip-test", pretrained=path)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    bow = encoders.encode_texts(["red fox", "Fox red", "cat"], kind="random_bow", dim=300, seed=3)
    assert bow.shape == (3, 300) and float(bow.min()) >= 0 and float(bow.max()) < 1
    torch.testing.assert_close(bow[0], bow[1])  # bag of words: order and case do not matter
    again = encoders.encode_texts(["cat"], kind="random_bow", dim=300, seed=3)
    torch.testing.assert_close(again[0], bow[2])
    assert not torch.equal(encoders.encode_texts(["cat"], dim=300, seed=4)[0], bow[2])
    with pytest.raises(ValueError, match="valid kinds"):
        encoders.encode_texts(["cat"], kind="glove")


def test_split_features_reuses_teacher_features(tmp_path):
    rng = np.random.default_rng(0)
    data, teacher = tmp_path / "dataset", tmp_path / "teacher"
    data.mkdir(), teacher.mkdir()
    feats = {}
    for split, n in (("train", 6), ("val", 0), ("test", 3)):
        labels = rng.integers(0, 2, n)
        images = np.zeros((n, 4, 4, 3), np.uint8)
        np.savez(data / f"{split}.npz", labels=labels, ids=np.arange(n) + 100, images=images)
        feats[split], feats[f"{split}_labels"] = rng.standard_normal((n, 5)).astype(np.float32), labels
    np.savez(teacher / "features.npz", **feats)
    out = encoders.split_features(data, "teacher", "t", teacher_dir=teacher)
    assert set(out) == {"train", "test"}  # the empty val split is dropped
    np.testing.assert_array_equal(out["train"]["features"], feats["train"])
    np.testing.assert_array_equal(out["train"]["ids"], np.arange(6) + 100)
    feats["test_labels"] = 1 - feats["test_labels"]
    np.savez(teacher / "features.npz", **feats)
    with pytest.raises(ValueError, match="test split is missing or its labels differ"):
        encoders.split_features(data, "teacher", "t", teacher_dir=teacher)


def test_teacher_encoder_uses_forward_features(tmp_path):
    from pipeline.models.network import create_network, save_network

    spec = {"backbone": {"name": "cifar_resnet8"}, "neck": None, "head": {"name": "linear"}, "num_classes": 3}
    torch.manual_seed(0)
    net = create_network(spec).eval()
    save_network(net, tmp_path)
    enc = encoders.create_encoder("teacher", model_dir=tmp_path, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = enc.preprocess(np.full((2, 32, 32, 3), 255, np.uint8))
    torch.testing.assert_close(x, torch.ones(2, 3, 32, 32))  # (1 - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(x), net.forward_features(x))
    assert enc.dim == net.feature_dim
