"""DVC stage ``teacher@<name>``: train ``teachers.<name>`` and write ``data/teachers/<name>/``."""

from stages._cli import name_parser, run, train_stage


def main(args) -> None:
    train_stage("teachers", "teacher", args)


if __name__ == "__main__":
    run(main, name_parser(__doc__))
