"""DVC stage ``rebalance@<model>-<method>``: cRT, LWS, NCM or τ-normalisation of a trained model."""

from stages._cli import CHECKPOINTS, DATA, build_context, name_parser, run


def main(args) -> None:
    from pipeline.build import load_section, model_dir
    from pipeline.config import as_dict
    from pipeline.rebalance import rebalance
    from pipeline.tracking import create_tracker

    cfg = load_section("rebalance", args.name)
    ctx = build_context()
    model_dir(ctx, cfg.model)  # fail on an unknown model before anything is written
    checkpoints = CHECKPOINTS / "rebalance" / args.name  # created by rebalance() once the source model loads
    tags = {"model": args.name, "method": cfg.method, "source_model": cfg.model, "dataset": ctx.dataset.name}
    with create_tracker(f"rebalance@{args.name}", f"rebalance-{args.name}", tags) as tracker:
        tracker.log_params(as_dict(cfg))
        summary = rebalance(cfg, ctx, DATA / "rebalance" / args.name, checkpoints, tracker)
        tracker.log_metrics({f"test/{k}": v for k, v in summary["test"]["main"].items() if v == v})
        if "tau" in summary:
            tracker.log_params({"chosen_tau": summary["tau"]})
        sweep = DATA / "rebalance" / args.name / "tau_sweep.png"
        if sweep.is_file():
            tracker.log_artifact(str(sweep), "plots")


if __name__ == "__main__":
    run(main, name_parser(__doc__))
