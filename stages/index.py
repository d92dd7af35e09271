"""DVC stage ``index@<name>``: build the retrieval memory ``index.<name>`` and write ``data/index/<name>/``.

Encodes the dataset's train split (test transform) with the configured frozen encoder, or reuses the teacher's
``features.npz`` for ``encoder.type: teacher``; builds the index and an exact one for recall@k; writes the memory,
``stats.json``, ``predictions.npz`` (``<split>/knn`` vote scores, ``<split>/nn`` one-hot, ``<split>_labels``) and
``metrics.json``, all atomically. The build and query times go to MLflow and ``data/timings/index@<name>.json``, not
into ``stats.json``: the outputs are a function of the inputs, so an identical rebuild reruns nothing downstream.
"""

from __future__ import annotations

from stages._cli import DATASET_DIR, data_root, name_parser, run, stage_tracker, timings_path


def load_config(name: str, train_size: int):
    from pipeline import config
    from pipeline.build import load_section
    from pipeline.index.memory import KINDS, METRICS

    cfg = load_section("index", name)
    for key, value, valid in (
        ("encoder.type", cfg.encoder.type, ("teacher", "timm", "open_clip")),
        ("kind", cfg.kind, KINDS),
        ("metric", cfg.metric, METRICS),
        ("split", cfg.split, ("train",)),
    ):
        if value not in valid:
            raise config.ConfigError(f"index.{name}.{key}: {value!r} is not one of {', '.join(valid)}")
    if not 1 <= cfg.k < train_size:
        raise config.ConfigError(
            f"index.{name}.k={cfg.k} must lie in [1, {train_size - 1}]: the index holds "
            f"{train_size} train images, one of which is the excluded query itself"
        )
    return cfg


def main(args) -> None:
    import numpy as np

    from pipeline.config import as_dict
    from pipeline.data.datasets import load_manifest
    from pipeline.index.encoders import split_features
    from pipeline.index.memory import build_memory_stats
    from pipeline.io import atomic_dir, write_json
    from pipeline.tracking import write_timings

    manifest = load_manifest(str(DATASET_DIR))
    cfg = load_config(args.name, manifest["split_sizes"]["train"])
    encoder = cfg.encoder
    root = data_root(args.seed)
    model_dir = root / "teachers" / encoder.model if encoder.type == "teacher" else None
    splits = split_features(
        DATASET_DIR,
        encoder.type,
        encoder.model,
        checkpoint_file=encoder.checkpoint_file,
        teacher_dir=model_dir,
        batch_size=cfg.batch_size,
    )
    memory, stats, predictions = build_memory_stats(
        splits.pop("train"),
        splits,
        train_counts=manifest["train_counts"],
        texts=manifest["classes"],
        kind=cfg.kind,
        metric=cfg.metric,
        k=cfg.k,
        M=cfg.M,
        ef_construction=cfg.ef_construction,
        ef_search=cfg.ef_search,
        **manifest["thresholds"],
    )
    timings = stats.pop("timings")  # run-specific: kept out of stats.json
    stats["encoder"] = vars(cfg.encoder)
    heads = ["knn", "nn"]
    metrics = {"heads": heads, **{s: {h: stats["splits"][s][h] for h in heads} for s in ("test", "val") if s in splits}}
    with atomic_dir(root / "index" / args.name) as tmp:
        memory.save(tmp, atomic=False)
        np.savez(tmp / "predictions.npz", **predictions)
        write_json(tmp / "stats.json", stats)
        write_json(tmp / "metrics.json", metrics)
    write_timings(timings_path("index", args.name, args.seed), timings)
    tags = {"model": args.name, "encoder": f"{encoder.type}:{encoder.model}", "dataset": manifest["source"]}
    with stage_tracker("index", args.name, args.seed, tags) as tracker:
        tracker.log_params(as_dict(cfg))
        tracker.log_metrics({f"test/{h}/{g}": v for h in heads for g, v in metrics.get("test", {}).get(h, {}).items()
                             if v == v} | {k: timings[k] for k in ("build_time_s", "exact_build_time_s")})
        tracker.log_artifact(str(root / "index" / args.name / "stats.json"))


if __name__ == "__main__":
    run(main, name_parser(__doc__))
