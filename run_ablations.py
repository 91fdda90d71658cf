"""sigprop's command line (also installed as the ``sigprop`` console script).

Bad input ends in one line on stderr and exit code 2; nothing already stored is touched.
Heavy modules (torch, pandas) are imported inside the commands, so ``--help`` and
``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ablations.overrides import parse_value
from ablations.shipped import GRIDS_DIR, shipped_grids, spec_path
from sigprop.errors import UserError, did_you_mean

DESCRIPTION = ("Signal-propagation analysis and ablation grids for normalizer-free networks: "
               "list models, plot signal propagation at init, run, resume and report grids.")
HINT = "try: sigprop quickstart (the demo, about 3 minutes on CPU), or sigprop COMMAND --help"
DEFAULT_OUT = "runs"  # the one output root: grids go to runs/<grid>, SPP plots to runs/spp


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        import re

        if message.startswith("unrecognized arguments") and re.search(
                r"(^|\s)(-v+|--verbose)(\s|$)", message.split(":", 1)[1]):
            message += f" (-v/--verbose is taken by {', '.join(VERBOSE_HELP)})"
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _check_value(self, action: argparse.Action, value) -> None:
        # argparse's own check, with the did-you-mean every other name gets (`modles`)
        choices = action.choices
        if choices is not None and value not in choices:
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{did_you_mean(value, choices)} (choose from "
                f"{', '.join(map(repr, choices))})")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        args, extras = self.parse_known_args(args, namespace)
        if extras:  # the closest option of the command given (`--dryrun`: --dry-run)
            commands = getattr(self, "commands", {})
            parser = commands.get(getattr(args, "command", None), self)
            flags = [flag for action in parser._actions for flag in action.option_strings]
            first = next((word for word in extras if word.startswith("-")), "")
            hint = did_you_mean(first.split("=", 1)[0], flags) if first else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return args


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their line breaks; an option with a default says it (unless its help
    already does, or the default is "off")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        off = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if "default" in text or off or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def package_version() -> str:
    """The installed distribution's version, else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("sigprop")
    except metadata.PackageNotFoundError:
        from sigprop import __version__

        return __version__


class VersionAction(argparse.Action):
    """--version: the metadata is looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog} {package_version()}")
        parser.exit()


class OutputLost(KeyboardInterrupt):
    """Standard output failed (``| head`` closed the pipe, ``> /dev/full``). A
    KeyboardInterrupt, so a grid stops as on Ctrl-C: the runs in flight store themselves as
    queued and the next invocation resumes them. ``note``: what became of the grid."""

    def __init__(self, error: OSError, note: str = "") -> None:
        super().__init__(error)
        self.error, self.note = error, note


class GuardedStream:
    """``sys.stdout`` or ``sys.stderr`` while a command runs.

    Text the stream's encoding cannot hold (a grid named "grille-é" under
    PYTHONIOENCODING=ascii) is written with backslash escapes instead of raising. The first
    write that fails points the file descriptor at /dev/null (so the interpreter's flush at
    exit says nothing more) and, on stdout (``fatal``), raises :class:`OutputLost`; whatever
    is written after that is dropped."""

    def __init__(self, stream: TextIO, fatal: bool) -> None:
        self.stream, self.fatal = stream, fatal
        self.lost: OSError | None = None

    def write(self, text: str) -> int:
        if self.lost is None:
            self._guard(self._write, text)
        return len(text)

    def flush(self) -> None:
        if self.lost is None:
            self._guard(self.stream.flush)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except UnicodeEncodeError:  # raised before anything is buffered: write it escaped
            encoding = self.stream.encoding or "ascii"
            self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))

    def _guard(self, call, *args) -> None:
        try:
            call(*args)
        except OSError as err:
            self.lost = err
            self._to_devnull()
            if self.fatal:
                raise OutputLost(err) from None

    def _to_devnull(self) -> None:
        try:
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
        except (OSError, ValueError):  # not a file (a test's StringIO)
            return
        try:
            os.dup2(null, fd)
        except OSError:
            pass
        finally:
            os.close(null)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextlib.contextmanager
def guarded_streams() -> Iterator[GuardedStream]:
    """sys.stdout and sys.stderr as :class:`GuardedStream` for the body (stdout yielded)."""
    out, err = GuardedStream(sys.stdout, fatal=True), GuardedStream(sys.stderr, fatal=False)
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    try:
        yield out
    finally:
        sys.stdout, sys.stderr = out.stream, err.stream


def fd_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def reserve_closed_fds() -> bool:
    """Put /dev/null on a closed stdin or stderr (else the next file opened, a store's, would
    get that number and a child's stray output would land in it); True if stdout is closed."""
    for fd in (0, 2):
        if fd_closed(fd):
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 2:
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - for the process
    return sys.stdout is None  # how Python starts with fd 1 closed


def output_lost(error: OSError, note: str = "") -> int:
    """The one line for a standard output that failed; 141 (as a shell reports a process
    ended by SIGPIPE) for a closed pipe, 1 for anything else (a full disk)."""
    why = error.strerror or str(error)
    print(f"sigprop: error: cannot write to standard output ({why})"
          f"{'; ' + note if note else ''}", file=sys.stderr)
    return 141 if error.errno == errno.EPIPE else 1


def verbosity(args: argparse.Namespace) -> int:
    """-1 with --quiet, 0 by default, 1 (or more) with --verbose."""
    if args.quiet and args.verbose:
        raise UserError("give -q/--quiet or -v/--verbose, not both")
    return -1 if args.quiet else args.verbose


def say(args: argparse.Namespace, line: str) -> None:
    """An informational line: printed unless --quiet."""
    if verbosity(args) >= 0:
        print(line)


# what -v adds, on the commands where it adds something
VERBOSE_HELP = {
    "run": "more detail: every run's start and end line also on a terminal",
    "quickstart": "more detail: every run's start and end line also on a terminal",
    "frontier": "more detail: every probe run's start and end line",
    "export": "more detail: every run folder written",
    "coord-check": "more detail: a line per model and width done",
}


def add_verbosity(parser: argparse.ArgumentParser, top: bool, command: str = "") -> None:
    # on the subcommands too (`sigprop run GRID -q`); there a flag not given keeps the top
    # level's value instead of overwriting it
    keep = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print only errors, warnings and the tables asked for",
                        **({"default": False} if top else keep))
    if top:
        parser.add_argument("-v", "--verbose", action="count", default=0,
                            help=f"more detail (for {', '.join(VERBOSE_HELP)})")
    elif command in VERBOSE_HELP:
        parser.add_argument("-v", "--verbose", action="count", help=VERBOSE_HELP[command],
                            **keep)


EXAMPLES = {
    "models": """\
examples:
  sigprop models
  sigprop models --family nfnet""",
    "spp": """\
examples:
  sigprop spp --model nf_resnet50 --model nf_resnet50:ws=False --model bn_resnet50_v2
  sigprop spp --model nf_resnet50 --model nfnet_f0 --input synthetic --seeds 2
  sigprop spp --preset paper-a-fig1 --out runs/spp_fig1""",
    "coord-check": """\
examples:
  sigprop coord-check
  sigprop coord-check --models nf_resnet26 --set ws=False --steps 4
  sigprop coord-check --widths 0.125,0.25,0.5,1 --lr 0.05 --seeds 3 --out runs/coord_wide""",
    "run": """\
examples:
  sigprop run quickstart --dry-run
  sigprop run lambda_batch --set data=digits --set batch_size=32,128,512 --workers 2
  sigprop run my_grid.toml --set seed=0,1,2 --out runs
  sigprop run agc_batch --executor ray --address auto --gpus-per-run 0.25""",
    "status": """\
examples:
  sigprop status runs/quickstart
  sigprop status runs""",
    "report": """\
examples:
  sigprop report runs/quickstart
  sigprop report runs/quickstart --out /tmp/report.html""",
    "quickstart": """\
examples:
  sigprop quickstart
  sigprop quickstart --workers 1 --out /tmp/runs""",
    "frontier": """\
examples:
  sigprop frontier frontier_batch --dry-run
  sigprop frontier frontier_batch --workers 2
  sigprop frontier frontier_batch --set seed=0 --set frontier.steps=20""",
    "export": """\
examples:
  sigprop export tensorboard runs/quickstart
  sigprop export tensorboard runs/quickstart --out /tmp/tb --live 30""",
}


def add_command(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand with the shared help layout, its examples and -q/-v."""
    p = sub.add_parser(name, formatter_class=HelpFormatter, epilog=EXAMPLES.get(name),
                       **kwargs)
    add_verbosity(p, top=False, command=name)
    return p


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


def add_coord_check_command(sub: argparse._SubParsersAction) -> None:
    # The defaults are sigprop.coordcheck's (an option not given is not passed); the help
    # states them without importing it, so --help stays instant (tests/test_coordcheck.py
    # checks the two agree).
    p = add_command(
        sub, "coord-check",
        help="mup's coordinate check: block activation size against width over the first "
        "training steps (frame as parquet + csv, plot as png)",
        description="Train each model at several width multipliers for a few plain-SGD steps "
        "on one fixed batch and record, per block, the mean absolute value (mup's l1) and the "
        "RMS of its output on every forward (step 0 = init). NF models get skipinit_gain=1.0 "
        "unless --set says otherwise; every model gets the CIFAR stem and the data set's "
        "class count. Stochastic depth and dropout are off; batch norm uses batch statistics.",
    )
    p.add_argument("--models", default=None, metavar="NAME[,NAME...]",
                   help="registered model names, see sigprop models (default: "
                   "nf_resnet26,bn_resnet26_v2)")
    p.add_argument("--widths", default=None, metavar="MULT[,MULT...]",
                   help="width multipliers, width_mult (default: 0.0625,0.125,0.25,0.5)")
    p.add_argument("--steps", type=int, default=None,
                   help="recorded forwards, the first at init, with one update between two "
                   "(default: 3)")
    p.add_argument("--lr", type=float, default=None,
                   help="plain SGD learning rate, no momentum (default: 0.1)")
    p.add_argument("--seeds", type=int, default=None,
                   help="inits averaged per width, mup's nseeds (default: 2)")
    p.add_argument("--data", default=None, metavar="NAME",
                   help="data set of the fixed batch: digits, synthetic, cifar10 or cifar100 "
                   "(default: digits)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: 32)")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="image side (default: the set's native size, 8 px for digits)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="data set directory (default $SIGPROP_DATA or ~/.cache/sigprop/data)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model option override for the models that have it, e.g. alpha=0.4")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--out", default=f"{DEFAULT_OUT}/coord_check", metavar="DIR",
                   help="output directory")
    p.set_defaults(func=cmd_coord_check)


def add_grid_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "run", help="run an ablation grid (resumes what is stored)",
        description="Expand a grid spec into runs, store them under OUT/<grid> and run what "
        "is not finished: completed and diverged runs are kept, interrupted ones resume from "
        "their checkpoint, failed ones rerun with --retry-failed. The report is written at "
        "the end.")
    p.add_argument("spec", help="a spec TOML file or a shipped grid name "
                   f"({', '.join(shipped_grids())})")
    add_run_options(p)
    add_rerun_option(p)
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs with the values they will use, and their count")
    p.set_defaults(func=cmd_run)

    p = add_command(
        sub, "frontier", help="the largest stable learning rate of every cell of a grid, by "
        "search (the spec's [frontier] section)",
        description="For every cell of the grid (its axes without lr), bisect on log-lr between "
        "the [frontier] bounds to its resolution; every probe is an ordinary stored run, so a "
        "rerun resumes and repeats no stored probe. Writes OUT/<grid>/frontier.parquet and the "
        "report.")
    p.add_argument("spec", help="a spec TOML file with a [frontier] section, or a shipped grid")
    add_run_options(p)
    p.add_argument("--method", default=None, metavar="{bisect,range-test}",
                   help="bisect (default): the search of fixed-rate probes; range-test: one run "
                   "per cell with the lr rising geometrically from lr_min to lr_max, the edge "
                   "where its loss blows up (fastai's lr_find); overrides [frontier] method")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells, the learning-rate lattice and the probe budget")
    p.set_defaults(func=cmd_frontier)

    p = add_command(sub, "status", help="table of a grid's runs and their states",
                    description="One row per stored run: its state (a running run with its "
                    "step), the values it varies, accuracy, diverged step and time.")
    p.add_argument("dir", help="a grid folder, or an output root holding grids")
    p.set_defaults(func=cmd_status)

    p = add_command(sub, "report", help="write report.html and report.md for a grid",
                    description="Build the grid's report from what is stored (a partial grid "
                    "too): report.html, self-contained, and report.md with its figures.")
    p.add_argument("dir", help="a grid folder (<out>/<grid>)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="report.html path (report.md goes beside it); default: in the grid")
    p.set_defaults(func=cmd_report)

    p = add_command(sub, "quickstart", help="the built-in demo: a 36-run grid on digits, SPPs "
                    "and the report",
                    description="Run the quickstart grid (NF-ResNet vs BN-ResNet, no clipping "
                    "/ global norm / AGC, batch 32 and 512, 3 seeds, on scikit-learn's digits), "
                    "plot signal propagation at init, write the report.")
    add_run_options(p)
    add_rerun_option(p)
    p.set_defaults(func=cmd_quickstart, workers=2)


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="override a key or make it an axis (repeatable)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local worker processes or Ray tasks")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="local worker processes (CPU)")
    p.add_argument("--runs-per-gpu", type=int, default=1, metavar="K",
                   help="local: runs sharing each GPU")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--address", default=None,
                   help="ray: cluster address (auto or HOST:PORT; default $RAY_ADDRESS or a "
                        "local instance)")
    p.add_argument("--cpus-per-run", type=float, default=1, metavar="N",
                   help="ray: CPUs per run")
    p.add_argument("--gpus-per-run", type=float, default=0, metavar="N",
                   help="ray: GPUs per run (0.25...)")
    p.add_argument("--max-retries", type=int, default=3, metavar="N",
                   help="ray: retries of crashed workers")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="results root; the grid goes to DIR/<grid>")
    p.add_argument("--retry-failed", action="store_true", help="rerun failed runs")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.add_argument("--download", action="store_true",
                   help="fetch missing CIFAR data into its data_dir before running (default: "
                        "stop and say where to put the files)")
    p.add_argument("--max-runs", type=int, default=None, metavar="N",
                   help="refuse grids with more combinations than this (default 10000)")
    p.add_argument("--heartbeat", type=float, default=30, metavar="SECONDS",
                   help="without a terminal: a line with step/total and loss per running "
                   "run every SECONDS (0: none)")
    p.add_argument("--no-live-tensorboard", action="store_true",
                   help="do not write running runs' curves to OUT/<grid>/live (TensorBoard "
                   "event files; on by default, changes no run id)")
    p.add_argument("--mlflow", default=None, metavar="URI",
                   help="also log every run to MLflow (the mlflow extra): a tracking server "
                   "http://HOST:PORT, sqlite:///FILE or a folder; one experiment per grid")
    add_reproducibility_options(p)


def add_reproducibility_options(p: argparse.ArgumentParser) -> None:
    """--threads and --deterministic (recorded in every run's environment)."""
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads per run; a CPU run's numbers depend on it, so it is "
                   "fixed, not cores / workers (recorded in each run's status.json)")
    p.add_argument("--deterministic", action="store_true",
                   help="CUDA: PyTorch's deterministic algorithms, deterministic cuDNN and a "
                   "fixed cuBLAS workspace (slower; on CPU accepted and recorded)")


def add_rerun_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rerun-if-env-differs", action="store_true",
                   help="run again, from step 0, the stored runs made under another thread "
                   "count, torch version, device or --deterministic (their old files are kept "
                   "aside) instead of reusing them")


DRY_RUN_ROWS = 50  # a dry run of a bigger grid shows its count and its first rows only


def max_runs(args: argparse.Namespace) -> int:
    from ablations.constants import MAX_RUNS

    limit = MAX_RUNS if getattr(args, "max_runs", None) is None else args.max_runs
    if limit < 1:
        raise UserError(f"--max-runs must be >= 1, got {limit}")
    return limit


def cmd_run(args: argparse.Namespace) -> int:
    import itertools

    from ablations.runner import dry_run_table
    from ablations.spec import check_keys, check_run_claims, expand, grid_size, iter_runs

    spec = load_grid(args, spec_path(args.spec))
    if args.dry_run:
        check_keys(spec)  # before the first line, so a bad key is the only line
        size, limit = grid_size(spec), max_runs(args)
        if size <= DRY_RUN_ROWS:
            runs = expand(spec, max_runs=None)  # checks the claims against the runs too
            print(dry_run_table(runs, list(spec.grid)).to_string(index=False))
            print(f"{len(runs)} runs in grid {spec.name}")
            for line in spec.untested_claims:
                print(f"claim {line}")
            return 0
        print(f"grid {spec.name}: {size:,} combinations (fewer runs where an axis does not "
              f"apply); the first {DRY_RUN_ROWS}:", flush=True)
        remaining = iter_runs(spec)  # the first rows at once, then the count
        first = list(itertools.islice(remaining, DRY_RUN_ROWS + 1))
        print(dry_run_table(first[:DRY_RUN_ROWS], list(spec.grid)).to_string(index=False),
              flush=True)
        if size > limit:  # counting could take as long as the limit is there to prevent
            if len(first) <= DRY_RUN_ROWS:  # the inapplicable axes left no more than these
                print(f"{len(first)} runs in grid {spec.name}")
            print(f"over the limit of {limit:,} runs: `run` needs --max-runs {size}")
            return 0
        runs = first + list(remaining)
        check_run_claims(spec, runs)
        shown = f" (the first {DRY_RUN_ROWS} above)" if len(runs) > DRY_RUN_ROWS else ""
        print(f"{len(runs)} runs in grid {spec.name}{shown}")
        for line in spec.untested_claims:
            print(f"claim {line}")
        return 0
    outcome = execute(spec, args)
    if not args.no_report and not outcome.interrupted:
        write_report(outcome.grid_dir, quiet=verbosity(args) < 0, mlflow_uri=args.mlflow)
    return exit_code(outcome)


def exit_code(outcome) -> int:
    """0, or 128 + the signal that interrupted the grid (130 Ctrl-C, 143 SIGTERM)."""
    if not outcome.interrupted:
        return 0
    return 143 if outcome.signal == "SIGTERM" else 130


# paper A's Figure 1 trio: NF-ResNet, the same without scaled WS (mean shift), BN-ResNet v2
QUICKSTART_SPP_MODELS = [
    "nf_resnet50", ("nf_resnet50", {"ws": False}), "bn_resnet50_v2",
]


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The quickstart grid on digits, the SPPs of the models at init, the report."""
    from sigprop.spp import write_spp

    spec = load_grid(args, GRIDS_DIR / "quickstart.toml")
    outcome = execute(spec, args)
    if outcome.interrupted:
        return exit_code(outcome)
    spp = write_spp(QUICKSTART_SPP_MODELS, out_dir=outcome.grid_dir / "spp")
    say(args, f"signal propagation at init: {draw_spp(spp['parquet'])}")
    if not args.no_report:
        write_report(outcome.grid_dir, quiet=verbosity(args) < 0, mlflow_uri=args.mlflow)
    return 0


def write_report(grid_dir: Path, out: str | None = None, quiet: bool = False,
                 mlflow_uri: str | None = None) -> None:
    from reports.build import build_report

    paths = build_report(grid_dir, out)
    if not quiet:
        print(f"report: {paths['html']} (markdown: {paths['md']})")
    if mlflow_uri:
        from ablations.tracking import log_report

        problem = log_report(mlflow_uri, Path(grid_dir).name, paths)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
        elif not quiet:
            print(f"report logged to MLflow ({mlflow_uri}), run 'report'")


def cmd_report(args: argparse.Namespace) -> int:
    write_report(Path(args.dir), args.out, quiet=verbosity(args) < 0)
    return 0


def heartbeat_s(args: argparse.Namespace) -> float:
    if not (math.isfinite(args.heartbeat) and args.heartbeat >= 0):
        raise UserError(f"--heartbeat must be a finite number of seconds >= 0 (0: none), got "
                        f"{args.heartbeat:g}")
    return args.heartbeat


def run_options(args: argparse.Namespace) -> dict:
    """The options `run` and `frontier` both pass on (:class:`ablations.runner.RunOptions`)."""
    return {"retry_failed": args.retry_failed, "max_runs": max_runs(args),
            "download": args.download, "verbosity": verbosity(args),
            "heartbeat_s": heartbeat_s(args)}


def load_grid(args: argparse.Namespace, path: Path):
    """The spec at ``path`` with ``--set``, once every run option is known to be valid and the
    grid's folder fits the file system (so a dry run catches all of it too)."""
    from ablations.spec import load_spec

    check_run_options(args)
    spec = load_spec(path, args.set)
    check_grid_path(args.out, spec.name)
    return spec


def check_run_options(args: argparse.Namespace) -> None:
    """The numbers of the run options, checked before anything runs."""
    heartbeat_s(args)
    max_runs(args)
    for flag, value in (("--workers", args.workers), ("--runs-per-gpu", args.runs_per_gpu)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.max_retries < 0:  # Ray takes -1 for "retry forever"
        raise UserError(f"--max-retries must be >= 0, got {args.max_retries}")
    if not (math.isfinite(args.cpus_per_run) and args.cpus_per_run > 0):
        raise UserError(f"--cpus-per-run must be a finite number > 0, got {args.cpus_per_run:g}")
    if not (math.isfinite(args.gpus_per_run) and args.gpus_per_run >= 0):
        raise UserError(f"--gpus-per-run must be a finite number >= 0, got "
                        f"{args.gpus_per_run:g}")


# Bytes the store adds below a grid's folder, with room to spare: the deepest is a run's
# checkpoint being written, runs/<id>/.checkpoint.pt.<random>.tmp (45 bytes).
GRID_FILES_BYTES = 100


def check_grid_path(out: str, name: str) -> None:
    """``out/name`` and the store's files below it fit the file system's limits."""
    from ablations.constants import NAME_MAX

    if "\0" in out:
        raise UserError(f"--out {out!r} holds a NUL character")
    long_part = next((part for part in Path(out).parts
                      if len(os.fsencode(part)) > NAME_MAX), None)
    if long_part is not None:
        raise UserError(f"--out: the folder name {long_part[:40]!r}... is "
                        f"{len(os.fsencode(long_part))} bytes, over the limit of {NAME_MAX}")
    folder = os.path.abspath(os.path.join(out, name))
    limit = path_max(Path(folder))
    size = len(os.fsencode(folder))
    if size + GRID_FILES_BYTES >= limit:
        raise UserError(f"the grid folder {folder[:60]}... is a path of {size} bytes; with the "
                        f"store's files below it ({GRID_FILES_BYTES} more) it passes the file "
                        f"system's limit of {limit} bytes: use a shorter --out")


def path_max(path: Path) -> int:
    """The longest path the file system holding ``path`` (its nearest existing parent)
    accepts, in bytes."""
    existing = next((p for p in (path, *path.parents) if exists(p)), Path("/"))
    try:
        return os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096  # Linux's PATH_MAX


def exists(path: Path) -> bool:
    """Path.exists that answers False for a path the OS refuses to look up (too long)."""
    try:
        return path.exists()
    except OSError:
        return False


def make_executor(args: argparse.Namespace):
    from ablations.executors import LocalExecutor, RayExecutor

    if args.executor == "ray":
        return RayExecutor(args.address, args.cpus_per_run, args.gpus_per_run, args.max_retries,
                           threads=args.threads, deterministic=args.deterministic)
    return LocalExecutor(args.workers, args.device, args.runs_per_gpu, threads=args.threads,
                         deterministic=args.deterministic)


def check_output(note: str) -> None:
    """:class:`OutputLost` with ``note`` if standard output failed (what stopped the grid)."""
    lost = getattr(sys.stdout, "lost", None)
    if lost is not None:
        raise OutputLost(lost, note)


def tracking(args: argparse.Namespace):
    """The live trackers the workers open (ablations.tracking), set for one grid; --mlflow is
    checked here, before anything runs."""
    from ablations.tracking import check_mlflow_uri, live_enabled, tracking_environment

    args.mlflow = check_mlflow_uri(getattr(args, "mlflow", None))
    live = live_enabled() and not getattr(args, "no_live_tensorboard", False)  # env: default
    return tracking_environment(live=live, mlflow_uri=args.mlflow)


def execute(spec, args: argparse.Namespace):
    from ablations.runner import run_grid

    executor = make_executor(args)
    with tracking(args):
        outcome = run_grid(spec, args.out, executor,
                           rerun_if_env_differs=args.rerun_if_env_differs, **run_options(args))
    counts = ", ".join(f"{n} {state}" for state, n in sorted(outcome.counts.items()))
    if outcome.interrupted:
        check_output(f"the grid stopped after {outcome.duration_s:.0f}s "
                     f"({counts or 'nothing finished'}): finished runs are stored, the ones in "
                     f"flight queued; run the same command to resume")
        print(f"interrupted after {outcome.duration_s:.0f}s ({counts or 'nothing finished'}); "
              f"finished runs are stored, run the same command to resume", file=sys.stderr)
    elif counts:
        say(args, f"grid {spec.name} done in {outcome.duration_s:.0f}s: {counts}")
    say(args, f"results: {outcome.grid_dir}")
    return outcome


def cmd_frontier(args: argparse.Namespace) -> int:
    """The stability frontier of every cell of a spec with a [frontier] section."""
    import math

    from ablations.frontier import cells_of, frontier_settings, lattice, run_frontier
    from ablations.runner import dry_run_table

    spec = load_grid(args, spec_path(args.spec))
    if args.method is not None and spec.frontier:  # checked with the section's other keys
        spec.frontier = {**spec.frontier, "method": args.method}
        frontier_settings(spec)
    if args.dry_run:
        settings, cells = cells_of(spec, max_runs(args))
        points = lattice(settings)
        print(dry_run_table(cells).to_string(index=False))
        if settings.method == "range-test":
            print(f"{len(cells)} cells in grid {spec.name}; range test: 1 run per cell, lr "
                  f"rising geometrically from {settings.lr_min:g} to {settings.lr_max:g}, edges "
                  f"snapped to the x{settings.resolution:.4g} lattice ({len(cells)} runs)")
            return 0
        print(f"{len(cells)} cells in grid {spec.name}; lr {settings.lr_min:g} to "
              f"{settings.lr_max:g} by x{settings.resolution:.4g}: {len(points)} rates, at most "
              f"{math.ceil(math.log2(len(points) + 1))} probes per cell (a full grid: "
              f"{len(cells) * len(points)} runs)")
        # the bound above is the cold bisection's; say what changes it
        extras = [("warm starts: 2 probes per cell near its start, more far from it"
                   if settings.warm_start else ""),
                  ("at most 1 more per cell for the monotonicity check"
                   if settings.check_monotone else "")]
        if any(extras):
            print("; ".join(e for e in extras if e))
        for line in spec.untested_claims:
            print(f"claim {line}")
        return 0
    with tracking(args):
        outcome = run_frontier(spec, args.out, make_executor(args), **run_options(args))
    counts = ", ".join(f"{n} {state}" for state, n in sorted(outcome.counts.items()))
    kind = "range-test" if (spec.frontier or {}).get("method") == "range-test" else "probe"
    probes = (f"{outcome.probes_run} {kind} runs ({outcome.probes_stored} read back from the "
              f"store; a full grid at this resolution: {outcome.full_grid} runs)")
    if outcome.interrupted:
        check_output(f"the search stopped after {outcome.duration_s:.0f}s: {probes}; finished "
                     f"probes are stored, run the same command to resume")
        print(f"interrupted after {outcome.duration_s:.0f}s: {probes}; finished probes are "
              f"stored, run the same command to resume", file=sys.stderr)
        return exit_code(outcome)
    say(args, f"frontier {spec.name} done in {outcome.duration_s:.0f}s: {len(outcome.frame)} "
        f"cells ({counts}; {outcome.non_monotone} non-monotone); {probes}")
    say(args, f"frontier: {outcome.grid_dir / 'frontier.parquet'}")
    if not args.no_report:
        write_report(outcome.grid_dir, quiet=verbosity(args) < 0, mlflow_uri=args.mlflow)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import pandas as pd

    from ablations.runner import status_table

    table = status_table(args.dir)
    # a diagnosis is a sentence: one line per diverged run under the table, not a column
    diagnoses = table.pop("diagnosis") if "diagnosis" in table else None
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table.to_string(index=False))
    counts = table["status"].value_counts().to_dict()
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    if diagnoses is not None:
        lines = [f"  {grid}/{rid}: {text}" for grid, rid, text
                 in zip(table["grid"], table["run_id"], diagnoses) if text]
        if lines:
            print("where the diverged runs broke (first statistic over 10x its early median):")
            print("\n".join(lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A grid as a TensorBoard log dir (scalars per run + the HParams dashboard)."""
    try:
        import tensorboard  # noqa: F401 - an optional extra; say how to get it
    except ImportError:
        raise UserError("export tensorboard needs the tensorboard package: pip install "
                        "sigprop[tensorboard] (in a checkout: pip install -e '.[tensorboard]')"
                        ) from None
    from reports.tensorboard import export_tensorboard, resolve_grid, watch_tensorboard

    out = Path(args.out) if args.out else resolve_grid(args.dir) / "tensorboard"
    level = verbosity(args)

    def tell(result) -> None:  # -q: nothing; -v: also every run folder written
        if level < 0:
            return
        print(result.line(), flush=True)
        if level >= 1:
            for folder in result.added:
                print(f"  {out / folder}", flush=True)

    if args.live is None:
        tell(export_tensorboard(args.dir, out))
        say(args, f"open it with: tensorboard --logdir {out}")
        return 0
    opened = []

    def tell_live(result) -> None:  # the command to open it once the log dir exists
        tell(result)
        if not opened:
            opened.append(result)
            say(args, f"open it with: tensorboard --logdir {out}  (exporting again every "
                f"{args.live:g}s while runs are queued or running; Ctrl-C stops)")

    try:
        watch_tensorboard(args.dir, out, args.live, say=tell_live)
    except KeyboardInterrupt:
        print("stopped watching; what was exported stays", file=sys.stderr)
        return 0
    say(args, "no run left to wait for")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sigprop", description=DESCRIPTION, epilog=HINT,
                           formatter_class=HelpFormatter)
    parser.add_argument("--version", action=VersionAction)
    add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser, metavar="COMMAND")
    parser.commands = sub.choices  # type: ignore[attr-defined] # the flags of each, for hints

    p = add_command(sub, "models", help="list the registered models",
                    description="The model registry: name, family, parameters, depth and "
                    "input resolution.")
    p.add_argument("--family", choices=["nf_resnet", "nfnet", "bn_resnet"], default=None,
                   help="only this family (default: all)")
    p.set_defaults(func=cmd_models)

    p = add_command(
        sub, "spp",
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
    p.add_argument("--out", default=f"{DEFAULT_OUT}/spp", metavar="DIR",
                   help="output directory")
    p.set_defaults(func=cmd_spp)

    add_coord_check_command(sub)
    add_grid_commands(sub)

    p = add_command(sub, "export", help="export a grid to TensorBoard (scalars + HParams)")
    p.add_argument("format", choices=["tensorboard"], help="the export format")
    p.add_argument("dir", metavar="GRID", help="a grid folder (<out>/<grid>)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="TensorBoard log dir (default: GRID/tensorboard); exporting again "
                        "adds the runs finished since")
    p.add_argument("--live", type=float, default=None, metavar="SECONDS",
                   help="export again every SECONDS while runs are queued or running")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code. No command prints the help and a hint (exit 0:
    asking what there is is no error; ``make demo`` names ``quickstart``).

    Standard output that fails (a closed pipe, a full disk) ends the command with one line on
    stderr and exit code 141 (closed pipe) or 1, a grid stopped as on Ctrl-C; a closed one
    (``>&-``) is refused before anything runs."""
    if reserve_closed_fds():
        print("sigprop: error: standard output is closed; send it to a file or /dev/null "
              "(> /dev/null) instead of closing it", file=sys.stderr)
        return 2
    with guarded_streams() as out:
        try:
            code = run_command(argv)
            sys.stdout.flush()  # a full disk shows here, not as a message at exit
        except OutputLost as lost:
            return output_lost(lost.error, lost.note)
        if out.lost is not None:  # failed where the command went on (export --live)
            return output_lost(out.lost)
        return code


def run_command(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()  # its epilog is the hint
        return 0
    try:
        verbosity(args)  # -q with -v is an error before anything runs
        return args.func(args)
    except UserError as err:
        print(f"sigprop: error: {err}", file=sys.stderr)
        return 2
    except OutputLost:
        raise
    except KeyboardInterrupt:
        print("sigprop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
