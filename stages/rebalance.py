"""DVC stage ``rebalance@<model>-<method>``: cRT, LWS, NCM or τ-normalisation of a trained model."""

from stages._cli import (
    build_context,
    checkpoint_root,
    name_parser,
    offset_seed,
    run,
    stage_tracker,
    timings_path,
)


def main(args) -> None:
    from pipeline.build import load_section, model_dir
    from pipeline.config import as_dict
    from pipeline.rebalance import rebalance

    cfg = offset_seed(load_section("rebalance", args.name), args.seed)
    ctx = build_context(args.seed)
    model_dir(ctx, cfg.model)  # fail on an unknown model before anything is written
    checkpoints = checkpoint_root(args.seed) / "rebalance" / args.name  # created by rebalance() once the model loads
    out = ctx.data_root / "rebalance" / args.name
    tags = {"model": args.name, "method": cfg.method, "source_model": cfg.model, "dataset": ctx.dataset.name}
    with stage_tracker("rebalance", args.name, args.seed, tags) as tracker:
        tracker.log_params(as_dict(cfg))
        summary = rebalance(cfg, ctx, out, checkpoints, tracker, timings_path("rebalance", args.name, args.seed))
        tracker.log_metrics({f"test/{k}": v for k, v in summary["test"]["main"].items() if v == v})
        if "tau" in summary:
            tracker.log_params({"chosen_tau": summary["tau"]})
        sweep = out / "tau_sweep.png"
        if sweep.is_file():
            tracker.log_artifact(str(sweep), "plots")


if __name__ == "__main__":
    run(main, name_parser(__doc__))
