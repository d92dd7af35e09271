"""DVC stage ``upper_bound``: the CE recipe trained on the balanced counterpart of the training set."""

import argparse

from stages._cli import (
    DATASET_DIR,
    add_seed_argument,
    checkpoint_root,
    data_root,
    offset_seed,
    run,
    stage_tracker,
    timings_path,
)


def main(args: argparse.Namespace) -> None:
    from pipeline.build import load_section
    from pipeline.config import as_dict
    from pipeline.upper_bound import train_upper_bound

    cfg = load_section("upper_bound")
    recipe = offset_seed(load_section("teachers", cfg.recipe), args.seed)
    dataset = load_section("dataset")
    if not (DATASET_DIR / "manifest.json").is_file():
        raise FileNotFoundError(f"{DATASET_DIR}/manifest.json not found: run the dataset stage first")
    tags = {"model": f"upper_bound/{cfg.recipe}", "method": recipe.method, "dataset": f"{dataset.name}-balanced"}
    with stage_tracker("upper_bound", None, args.seed, tags, run=f"upper_bound-{cfg.recipe}") as tracker:
        tracker.log_params(as_dict(recipe))
        train_upper_bound(dataset, cfg.recipe, recipe, DATASET_DIR, data_root(args.seed) / "upper_bound",
                          checkpoint_root(args.seed) / "upper_bound", tracker,
                          timings_path("upper_bound", None, args.seed))


if __name__ == "__main__":
    run(main, add_seed_argument(argparse.ArgumentParser(description=__doc__)))
