"""sigprop's command line (also installed as the ``sigprop`` console script).

Bad input ends in one line on stderr and exit code 2; nothing already stored is touched.
"""

from __future__ import annotations

import argparse
import sys

from ablations.spec import parse_value
from sigprop.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def cmd_models(args: argparse.Namespace) -> int:
    from sigprop.models.table import model_table

    table = model_table(family=args.family)
    print(table.to_string(index=False))
    return 0


def parse_overrides(pairs: list[str] | None) -> dict:
    overrides = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"an override is key=value, got {pair!r}")
        overrides[key] = parse_value(text.strip())
    return overrides


def parse_model_arg(text: str) -> str | tuple[str, dict]:
    """``NAME`` or ``NAME:key=value[:key=value...]`` (overrides for that model only)."""
    name, *pairs = text.split(":")
    return (name, parse_overrides(pairs)) if pairs else name


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"--input-shape wants N,C,H,W integers, got {text!r}") from None
    from sigprop.spp import check_input_shape

    return check_input_shape(shape)


def cmd_spp(args: argparse.Namespace) -> int:
    from sigprop.spp import (
        DEFAULT_INPUT_SHAPE,
        DEFAULT_SEEDS,
        check_input,
        preset,
        preset_caption,
        write_spp,
    )

    check_input(args.input)
    overrides = parse_overrides(args.set)
    caption = None
    if args.preset is not None:
        if args.model:
            raise UserError("give --model or --preset, not both")
        chosen = preset(args.preset)
        shape = chosen.full_input_shape if args.full_size else chosen.input_shape
        overrides = {**(chosen.full_overrides if args.full_size else chosen.overrides),
                     **overrides}
        models = list(chosen.models)
        seeds = chosen.seeds if args.seeds is None else args.seeds
    else:
        if not args.model:
            raise UserError("name a model (--model NAME) or a preset (--preset NAME)")
        if args.full_size:
            raise UserError("--full-size goes with --preset")
        shape = DEFAULT_INPUT_SHAPE
        models = [parse_model_arg(text) for text in args.model]
        seeds = DEFAULT_SEEDS if args.seeds is None else args.seeds
    if args.input_shape is not None:
        shape = parse_shape(args.input_shape)
    if args.preset is not None:
        caption = preset_caption(args.preset, args.full_size, overrides, shape,
                                 list(range(seeds)),
                                 args.input)
    paths = write_spp(
        models=models,
        overrides=overrides,
        input_shape=shape,
        seeds=seeds,
        out_dir=args.out,
        input=args.input,
        data_dir=args.data_dir,
        caption=caption,
        warn=lambda line: print(f"sigprop: warning: {line}", file=sys.stderr),
    )
    for kind, path in paths.items():
        print(f"{kind:<8} {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sigprop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("--family", choices=["nf_resnet", "nfnet", "bn_resnet"], default=None)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "spp",
        help="signal-propagation plot at init (frame as parquet + csv, plot as png)",
        description="Measure the average channel squared mean, variance and residual variance "
        "at the stem and every block at initialization (N(0,1) noise or a data set's images, "
        "batch-norm statistics of the batch, nothing dropped). NF models get "
        "skipinit_gain=1.0 unless --set says otherwise. Each --set applies to the models that "
        "have that option; options after a model name apply to that model only, e.g. --model "
        "nf_resnet50 --model nf_resnet50:ws=False. Padding is the authors' TF 'SAME' unless "
        "--set padding=symmetric.",
    )
    p.add_argument("--model", action="append", default=[], metavar="NAME[:KEY=VALUE...]",
                   help="registered model name, optionally with its own overrides (repeat "
                   "for several lines in the plot)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="a named figure instead of --model: paper-a-fig1 (ResNet-600: NF with "
                   "and without WS, BN-ReLU-Conv and ReLU-BN-Conv; width_mult 0.25 at 512 px "
                   "unless --full-size)")
    p.add_argument("--full-size", action="store_true",
                   help="with --preset: the paper's widths (slow on CPU, see BENCHMARKS.md)")
    p.add_argument("--input", default="noise", metavar="KIND",
                   help="noise (i.i.d. N(0,1), default), synthetic, digits or cifar10 (a batch "
                   "of training images, normalised per channel)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="data set directory (default $SIGPROP_DATA or ~/.cache/sigprop/data)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model option override, e.g. width_mult=0.25 or depths=[8,8,8,8]")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="shape of the input batch (default 8,3,128,128: about ten seconds on "
                   "two CPU cores for a ResNet-50 pair; a preset has its own)")
    p.add_argument("--seeds", type=int, default=None,
                   help="fresh init + fresh batch per seed (default 3; a preset: its own)")
    p.add_argument("--out", default="spp_out", metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_spp)

    from ablations.cli import add_grid_commands

    add_grid_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["quickstart"])
    try:
        return args.func(args)
    except UserError as err:
        print(f"sigprop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sigprop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head and closed
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
