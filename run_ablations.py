"""sigprop's command line (also installed as the ``sigprop`` console script): the grid
commands here, the model commands (models, spp, coord-check) in cli_measure, their arguments in
cli_parser, the console plumbing in cli_console.

Bad input ends in one line on stderr and exit code 2; nothing already stored is touched.
Heavy modules (torch, pandas) are imported inside the commands, so ``--help`` and
``--version`` answer at once.

Paper A (spp and its Figure 1 preset): Brock, De and Smith, "Characterizing signal propagation
to close the performance gap in unnormalized ResNets", ICLR 2021, arXiv 2101.08692. Paper B
(the grids, clipping and the frontier): Brock, De, Smith and Simonyan, "High-Performance
Large-Scale Image Recognition Without Normalization", ICML 2021, arXiv 2102.06171.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import cli_parser
from ablations.shipped import GRIDS_DIR, spec_path
from cli_console import (  # noqa: F401 - re-exported: the command line's names stay here
    GuardedStream,
    HelpFormatter,
    OneLineParser,
    OutputLost,
    VersionAction,
    add_verbosity,
    check_output,
    fd_closed,
    guarded_streams,
    output_lost,
    package_version,
    reserve_closed_fds,
    say,
    verbosity,
)
from cli_measure import cmd_coord_check, cmd_models, cmd_spp, draw_spp
from cli_parser import (  # noqa: F401 - re-exported
    DEFAULT_OUT,
    DESCRIPTION,
    EXAMPLES,
    HINT,
    add_command,
    add_run_options,
)
from sigprop.errors import UserError

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
        # no lr column: every probe (and every range-test step) sets its own
        print(dry_run_table(cells).drop(columns="lr").to_string(index=False))
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
    """The command line (cli_parser), each command run by its ``cmd_*`` here, looked up when
    the parser is built so that a replaced one is the one called."""
    return cli_parser.build_parser({
        "models": cmd_models, "spp": cmd_spp, "coord-check": cmd_coord_check, "run": cmd_run,
        "frontier": cmd_frontier, "status": cmd_status, "report": cmd_report,
        "quickstart": cmd_quickstart, "export": cmd_export,
    })


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
