"""DVC stage ``upper_bound``: the CE recipe trained on the balanced counterpart of the training set."""

import argparse

from stages._cli import CHECKPOINTS, DATA, DATASET_DIR, run


def main(args: argparse.Namespace) -> None:
    from pipeline.build import load_section
    from pipeline.config import as_dict
    from pipeline.tracking import create_tracker
    from pipeline.upper_bound import train_upper_bound

    cfg = load_section("upper_bound")
    recipe = load_section("teachers", cfg.recipe)
    dataset = load_section("dataset")
    if not (DATASET_DIR / "manifest.json").is_file():
        raise FileNotFoundError(f"{DATASET_DIR}/manifest.json not found: run the dataset stage first")
    tags = {"model": f"upper_bound/{cfg.recipe}", "method": recipe.method, "dataset": f"{dataset.name}-balanced"}
    with create_tracker("upper_bound", f"upper_bound-{cfg.recipe}", tags) as tracker:
        tracker.log_params(as_dict(recipe))
        train_upper_bound(dataset, cfg.recipe, recipe, DATASET_DIR, DATA / "upper_bound", CHECKPOINTS / "upper_bound",
                          tracker)


if __name__ == "__main__":
    run(main, argparse.ArgumentParser(description=__doc__))
