"""DVC stage ``memory@<name>``: score a trained RAC student against the changed memory ``memory.<name>``."""

from stages._cli import build_context, name_parser, run, stage_tracker


def main(args) -> None:
    from pipeline.build import load_section
    from pipeline.config import as_dict
    from pipeline.memory import score_memory

    cfg = load_section("memory", args.name)
    student = load_section("students", cfg.model)
    ctx = build_context(args.seed)
    tags = {"model": args.name, "source_model": f"students/{cfg.model}", "dataset": ctx.dataset.name}
    with stage_tracker("memory", args.name, args.seed, tags) as tracker:
        tracker.log_params(as_dict(cfg))
        summary = score_memory(cfg, student, ctx, ctx.data_root / "memory" / args.name)
        tracker.log_metrics({f"test/{h}/{k}": v for h, acc in summary["test"].items() for k, v in acc.items()
                             if v == v} | {"memory_size": summary["memory_size"]})


if __name__ == "__main__":
    run(main, name_parser(__doc__))
