"""DVC stage ``dataset``: build the long-tailed train split and balanced val/test splits into ``data/dataset/``."""

import argparse

from stages._cli import DATASET_DIR, run


def main(args: argparse.Namespace) -> None:
    from pipeline.build import load_section
    from pipeline.config import as_dict
    from pipeline.data import build_longtail, load_source, plot_class_counts, save_dataset
    from pipeline.tracking import create_tracker

    cfg = load_section("dataset")
    kwargs = {"digits": dict(image_size=cfg.image_size),
              "synthetic": dict(num_classes=cfg.num_classes, images_per_class=cfg.images_per_class,
                                image_size=cfg.image_size, seed=cfg.seed),
              "cifar10": dict(root=cfg.root, download=cfg.download),
              "cifar100": dict(root=cfg.root, download=cfg.download),
              "imagefolder": dict(root=cfg.root, train_file=cfg.train_file, val_file=cfg.val_file,
                                  test_file=cfg.test_file)}[cfg.source]
    source = load_source(cfg.source, **kwargs)
    ds = build_longtail(source, profile=cfg.profile, imbalance_factor=cfg.imbalance_factor, n_max=cfg.n_max,
                        val_per_class=cfg.val_per_class, test_per_class=cfg.test_per_class, seed=cfg.seed,
                        many=cfg.many, few=cfg.few)
    save_dataset(ds, str(DATASET_DIR))
    plot = DATASET_DIR / "class_counts.png"
    plot_class_counts(ds.train_counts, ds.shot_groups, str(plot))
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
