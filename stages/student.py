"""DVC stage ``student@<name>``: train ``students.<name>`` (CBD, ...) and write ``data/students/<name>/``."""

from stages._cli import name_parser, run, train_stage


def main(args) -> None:
    train_stage("students", "student", args)


if __name__ == "__main__":
    run(main, name_parser(__doc__))
