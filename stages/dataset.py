"""DVC stage ``dataset``: build the long-tailed train split and balanced val/test splits into ``data/dataset/``."""

import argparse

from stages._cli import DATASET_DIR, run


def main(args: argparse.Namespace) -> None:
    from pipeline.build import dataset_from_config, load_section
    from pipeline.config import as_dict
    from pipeline.data import save_dataset
    from pipeline.tracking import create_tracker

    cfg = load_section("dataset")
    ds = dataset_from_config(cfg)
    save_dataset(ds, str(DATASET_DIR), plot=True)  # the plot is part of the atomic write
    plot = DATASET_DIR / "class_counts.png"
    m = ds.manifest()
    print(f"dataset {cfg.name}: {m['split_sizes']} images, {m['num_classes']} classes, "
          f"imbalance {m['imbalance_factor']:.1f}, shot groups {m['shot_group_sizes']}")
    with create_tracker("dataset", f"dataset-{cfg.name}", {"dataset": cfg.name}) as tracker:
        tracker.log_params(as_dict(cfg))
        tracker.log_metrics({f"split_size/{k}": v for k, v in m["split_sizes"].items()})
        tracker.log_artifact(str(DATASET_DIR / "manifest.json"))
        tracker.log_artifact(str(plot))


if __name__ == "__main__":
    run(main, argparse.ArgumentParser(description=__doc__))
