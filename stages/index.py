"""DVC stage ``index@<name>``: build the retrieval memory ``index.<name>`` and write ``data/index/<name>/``.

Encodes the dataset's train split (test transform) with the configured frozen encoder, or reuses the teacher's
``features.npz`` for ``encoder.type: teacher``; builds the index and an exact one for recall@k; writes the memory,
``stats.json``, ``predictions.npz`` (``<split>/knn`` vote scores, ``<split>/nn`` one-hot, ``<split>_labels``) and
``metrics.json``, all atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages._cli import DATA, DATASET_DIR, name_parser, run


@dataclass
class EncoderConfig:
    type: str = "teacher"  # teacher | timm | open_clip
    model: str = "ce"  # teacher name (data/teachers/<model>) or a timm / open_clip model id
    checkpoint_file: str | None = None  # local weights (timm file; open_clip file or tag)


@dataclass
class IndexConfig:
    """One ``index.<name>`` entry."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    kind: str = "hnsw"  # hnsw | exact
    metric: str = "cosine"  # cosine | l2 | ip
    M: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    k: int = 30
    split: str = "train"
    batch_size: int = 256


def load_config(name: str, train_size: int) -> IndexConfig:
    from pipeline import config
    from pipeline.index.memory import KINDS, METRICS

    if "index" in config.SCHEMAS:  # the lead's schema, once pipeline/config.py has one
        cfg = config.load_section("index", name)
    else:
        entries = config.read_params().get("index") or {}
        if name not in entries:
            raise config.ConfigError(f"index.{name} is not in params.yaml; defined: {', '.join(entries) or 'none'}")
        cfg = config.to_schema(IndexConfig, entries[name], f"index.{name}")
    for key, value, valid in (("encoder.type", cfg.encoder.type, ("teacher", "timm", "open_clip")),
                              ("kind", cfg.kind, KINDS), ("metric", cfg.metric, METRICS), ("split", cfg.split, ("train",))):
        if value not in valid:
            raise config.ConfigError(f"index.{name}.{key}: {value!r} is not one of {', '.join(valid)}")
    if not 1 <= cfg.k < train_size:
        raise config.ConfigError(f"index.{name}.k={cfg.k} must lie in [1, {train_size - 1}]: the index holds "
                                 f"{train_size} train images, one of which is the excluded query itself")
    return cfg


def load_features(cfg: IndexConfig) -> dict[str, dict]:
    """``{split: {"features", "labels", "ids"}}`` for the non-empty splits of train, val and test."""
    import numpy as np

    from pipeline.data.datasets import load_split

    splits = {s: load_split(str(DATASET_DIR), s) for s in ("train", "val", "test")}
    if cfg.encoder.type == "teacher":  # reuse the teacher's embeddings (test transform) instead of re-encoding
        from pipeline.evaluate.predict import load_features as teacher_features

        feats = teacher_features(DATA / "teachers" / cfg.encoder.model)
        for s, d in splits.items():
            if len(d.labels) and not np.array_equal(feats.get(f"{s}_labels"), d.labels):
                raise ValueError(f"data/teachers/{cfg.encoder.model}/features.npz: {s} labels differ from data/dataset;"
                                 " rerun the teacher stage")
    else:
        from pipeline.build import resolve_device
        from pipeline.index.encoders import create_encoder, encode_images

        key = "checkpoint_file" if cfg.encoder.type == "timm" else "pretrained"
        encoder = create_encoder(cfg.encoder.type, model=cfg.encoder.model, **{key: cfg.encoder.checkpoint_file})
        feats = {s: encode_images(encoder, images=d.images, paths=d.paths, root=d.root, batch_size=cfg.batch_size,
                                  device=resolve_device("auto")) for s, d in splits.items() if len(d.labels)}
    return {s: {"features": feats[s], "labels": d.labels, "ids": d.ids} for s, d in splits.items() if len(d.labels)}


def main(args) -> None:
    import numpy as np

    from pipeline.data.datasets import load_manifest
    from pipeline.index.memory import build_memory_stats
    from pipeline.io import atomic_dir, write_json

    manifest = load_manifest(str(DATASET_DIR))
    cfg = load_config(args.name, manifest["split_sizes"]["train"])
    splits = load_features(cfg)
    memory, stats, predictions = build_memory_stats(
        splits.pop("train"), splits, train_counts=manifest["train_counts"], texts=manifest["classes"], kind=cfg.kind,
        metric=cfg.metric, k=cfg.k, M=cfg.M, ef_construction=cfg.ef_construction, ef_search=cfg.ef_search,
        **manifest["thresholds"])
    stats["encoder"] = vars(cfg.encoder)
    heads = ["knn", "nn"]
    metrics = {"heads": heads, **{s: {h: stats["splits"][s][h] for h in heads} for s in ("test", "val") if s in splits}}
    with atomic_dir(DATA / "index" / args.name) as tmp:
        memory.save(tmp, atomic=False)
        np.savez(tmp / "predictions.npz", **predictions)
        write_json(tmp / "stats.json", stats)
        write_json(tmp / "metrics.json", metrics)


if __name__ == "__main__":
    run(main, name_parser(__doc__))
