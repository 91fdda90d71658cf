"""The commands about models, without a grid: ``models`` (the table of every variant),
``spp`` (signal propagation at initialization) and ``coord-check`` (activation size over width
during the first training steps, mup's diagnostic). run_ablations passes them to the parser
with the grid commands; like those, they import torch, pandas and the plots inside the
command, so ``--help`` stays light.

Paper A (spp and its Figure 1 preset): Brock, De and Smith, "Characterizing signal propagation
to close the performance gap in unnormalized ResNets", ICLR 2021, arXiv 2101.08692.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ablations.overrides import parse_value
from cli_console import say, verbosity
from sigprop.errors import UserError


def cmd_models(args: argparse.Namespace) -> int:
    from sigprop.models.table import model_table

    table = model_table(family=args.family)
    # the README's words, "name, family, params, depth, px": params in millions, depth as the
    # total of blocks and the per-stage pattern, px the default input side
    table = table.assign(
        params=[f"{m:g}M" for m in table["params_M"]],
        depth=[f"{n} ({pattern})" for n, pattern in zip(table["blocks"], table["depth"])],
        px=table["resolution"],
    )[["name", "family", "params", "depth", "px"]]
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
        warn=lambda line: print(f"sigprop: warning: {line}", file=sys.stderr),
    )
    paths["png"] = draw_spp(paths["parquet"], caption)
    for kind, path in paths.items():
        say(args, f"{kind:<8} {path}")
    return 0


def draw_spp(parquet: Path, caption: str | None = None) -> Path:
    """``spp.png`` beside the measured frame, titled from it (input, shape, seeds) as the grid
    report titles it. The library measures; drawing belongs to the report layer."""
    import pandas as pd

    from reports.figures.spp import plot_spp

    png = parquet.with_suffix(".png")
    plot_spp(pd.read_parquet(parquet), caption=caption).savefig(png, dpi=120,
                                                               bbox_inches="tight")
    return png


def parse_numbers(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} wants comma-separated numbers, got {text!r}") from None


def cmd_coord_check(args: argparse.Namespace) -> int:
    import time

    from sigprop.coordcheck import write_coord_check

    given = {}
    if args.models is not None:
        names = [text.strip() for text in args.models.split(",") if text.strip()]
        if any(":" in name for name in names):
            raise UserError("--models takes names only; give options with --set KEY=VALUE")
        given["names"] = names
    if args.widths is not None:
        given["width_mults"] = parse_numbers(args.widths, "--widths")
    for key in ("data", "batch_size", "image_size", "steps", "lr", "seeds"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key)
    start = time.perf_counter()
    paths = write_coord_check(
        out_dir=args.out,
        warn=lambda line: print(f"sigprop: warning: {line}", file=sys.stderr),
        overrides=parse_overrides(args.set),
        device=args.device,
        data_dir=args.data_dir,
        progress=(lambda line: print(line)) if verbosity(args) > 0 else None,
        **given,
    )
    paths["png"] = draw_coord_check(paths["parquet"])
    for kind, path in paths.items():
        say(args, f"{kind:<8} {path}")
    say(args, f"took {time.perf_counter() - start:.0f} s")
    return 0


def draw_coord_check(parquet: Path) -> Path:
    """``coord.png`` beside the measured frame (the library measures, the report layer
    draws)."""
    import pandas as pd

    from reports.figures.coordcheck import plot_coord_data

    png = parquet.with_suffix(".png")
    plot_coord_data(pd.read_parquet(parquet)).savefig(png, dpi=110, bbox_inches="tight",
                                                      facecolor="white")
    return png
