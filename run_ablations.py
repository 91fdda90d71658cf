"""sigprop's command line (also installed as the ``sigprop`` console script).

Bad input ends in one line on stderr and exit code 2; nothing already stored is touched.
"""

from __future__ import annotations

import argparse
import sys

from sigprop.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def cmd_models(args: argparse.Namespace) -> int:
    from sigprop.models.table import model_table

    table = model_table(family=args.family)
    print(table.to_string(index=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sigprop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("--family", choices=["nf_resnet", "nfnet", "bn_resnet"], default=None)
    p.set_defaults(func=cmd_models)

    from ablations.cli import add_grid_commands

    add_grid_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["models"])
    try:
        return args.func(args)
    except UserError as err:
        print(f"sigprop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sigprop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
