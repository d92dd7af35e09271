"""DVC stage ``evaluate``: compare every model's test predictions in one table, DVC metrics and plots."""

import argparse
import csv
import shutil

from stages._cli import DATA, DATASET_DIR, run

REPORTS = DATA / "reports"


def main(args: argparse.Namespace) -> None:
    from pipeline.build import load_section
    from pipeline.config import as_dict
    from pipeline.data import load_manifest
    from pipeline.evaluate.plots import plot_per_class_accuracy, plot_seed_errorbars, plot_split_bars
    from pipeline.evaluate.report import (
        GROUPS,
        build_report,
        collect_seed_outputs,
        multi_head_models,
        per_class_rows,
        summary_markdown,
    )
    from pipeline.io import write_json
    from pipeline.tracking import create_tracker

    cfg = load_section("evaluate")
    replicas = load_section("seeds").replicas
    manifest = load_manifest(str(DATASET_DIR))
    report = build_report(*collect_seed_outputs(DATA, cfg.ensembles, replicas), manifest)
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "plots").mkdir(exist_ok=True)
    summary = summary_markdown(report)
    (REPORTS / "summary.md").write_text(summary)
    write_json(REPORTS / "metrics.json",
               {k: report[k] for k in ("dataset", "models", "seeds", "gap_closed", "vs_baseline")})
    rows = per_class_rows(report, manifest["train_counts"])
    with open(REPORTS / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    top = dict(sorted(report["models"].items(), key=lambda kv: -kv[1]["all"])[: cfg.plots_top])
    plot_per_class_accuracy({k: report["per_class"][k] for k in top}, manifest["train_counts"],
                            REPORTS / "plots" / "per_class_accuracy.png")
    plot_split_bars(top, REPORTS / "plots" / "split_accuracy.png")
    plot_seed_errorbars(report["seeds"], REPORTS / "plots" / "seeds.png", (report["gap_closed"] or {}).get("baseline"),
                        report["vs_baseline"])
    for model, keys in multi_head_models(report).items():  # each head's per-class accuracy against class frequency
        plot_per_class_accuracy({k.split(":", 1)[1]: report["per_class"][k] for k in keys}, manifest["train_counts"],
                                REPORTS / "plots" / f"heads_{model.replace('/', '_')}.png")
    shutil.copy(DATASET_DIR / "class_counts.png", REPORTS / "plots" / "class_counts.png")
    print(summary)
    with create_tracker("evaluate", "evaluate", {"dataset": manifest["source"]}) as tracker:
        tracker.log_params(as_dict(cfg))
        tracker.log_metrics({f"{m}/{g}".replace(":", "_"): v for m, acc in report["models"].items()
                             for g, v in acc.items() if v == v})
        tracker.log_metrics({f"seeds/{m}/{g}_{stat}".replace(":", "_"): st[g][stat] for m, st in report["seeds"].items()
                             if st["n"] > 1 for g in GROUPS for stat in ("mean", "std") if st[g][stat] == st[g][stat]})
        for path in (REPORTS / "summary.md", REPORTS / "metrics.json", REPORTS / "per_class.csv"):
            tracker.log_artifact(str(path))
        for path in sorted((REPORTS / "plots").glob("*.png")):
            tracker.log_artifact(str(path), "plots")
        for name, table in _comparison_tables(report).items():
            tracker.log_table(table, f"tables/{name}.json")


def _comparison_tables(report: dict) -> dict[str, dict[str, list]]:
    """The report as MLflow tables: ``comparison`` (one row per model and head, a column per shot group, and the
    gap closed per group where the report has it) and ``seeds`` (mean and std over seeds and whether the difference to
    the CE teacher exceeds two standard errors, when there are several seeds)."""
    from pipeline.evaluate.report import GROUPS as groups

    gap = (report.get("gap_closed") or {}).get("models", {})
    rows = [{"model": name.split(":", 1)[0], "head": name.split(":", 1)[1] if ":" in name else "main",
             **{g: acc[g] for g in groups}, **{f"gap_closed_{g}": gap[name][g] for g in groups if name in gap}}
            for name, acc in report["models"].items()]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tables = {"comparison": {c: [row.get(c) for row in rows] for c in columns}}
    seeds = list(report["seeds"].items())
    if any(st["n"] > 1 for _, st in seeds):
        vs = report.get("vs_baseline") or {}
        tables["seeds"] = {"model": [name for name, _ in seeds], "seeds": [st["n"] for _, st in seeds]}
        for g in groups:
            for stat in ("mean", "std"):
                tables["seeds"][f"{g}_{stat}"] = [st[g][stat] for _, st in seeds]
            tables["seeds"][f"{g}_beyond_2se"] = [(vs.get(name, {}).get(g) or {}).get("significant")
                                                  for name, _ in seeds]
    return tables


if __name__ == "__main__":
    run(main, argparse.ArgumentParser(description=__doc__))
