"""The arguments of sigprop's command line: every command, its options, help and examples.

Only argparse and light constants here (no torch, no pandas), so ``--help`` answers at once;
what each command does is run_ablations' ``cmd_*`` functions, passed in as ``handlers``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

from ablations.shipped import shipped_grids
from cli_console import HelpFormatter, OneLineParser, VersionAction, add_verbosity

Handlers = Mapping[str, Callable[[argparse.Namespace], int]]

DESCRIPTION = ("Signal-propagation analysis and ablation grids for normalizer-free networks: "
               "list models, plot signal propagation at init, run, resume and report grids.")
HINT = "try: sigprop quickstart (the demo, about 3 minutes on CPU), or sigprop COMMAND --help"
DEFAULT_OUT = "runs"  # the one output root: grids go to runs/<grid>, SPP plots to runs/spp


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



def add_model_data_options(p: argparse.ArgumentParser, set_help: str) -> None:
    """--data-dir and --set of the commands that build registered models themselves (spp,
    coord-check); a grid's runs take theirs from the spec."""
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="data set directory (default $SIGPROP_DATA or ~/.cache/sigprop/data)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)


def add_coord_check_command(sub: argparse._SubParsersAction, handlers: Handlers) -> None:
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
    add_model_data_options(
        p, set_help="model option override for the models that have it, e.g. alpha=0.4")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--out", default=f"{DEFAULT_OUT}/coord_check", metavar="DIR",
                   help="output directory")
    p.set_defaults(func=handlers["coord-check"])



def add_grid_commands(sub: argparse._SubParsersAction, handlers: Handlers) -> None:
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
    p.set_defaults(func=handlers["run"])

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
    p.set_defaults(func=handlers["frontier"])

    p = add_command(sub, "status", help="table of a grid's runs and their states",
                    description="One row per stored run: its state (a running run with its "
                    "step), the values it varies, accuracy, diverged step and time.")
    p.add_argument("dir", help="a grid folder, or an output root holding grids")
    p.set_defaults(func=handlers["status"])

    p = add_command(sub, "report", help="write report.html and report.md for a grid",
                    description="Build the grid's report from what is stored (a partial grid "
                    "too): report.html, self-contained, and report.md with its figures.")
    p.add_argument("dir", help="a grid folder (<out>/<grid>)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="report.html path (report.md goes beside it); default: in the grid")
    p.set_defaults(func=handlers["report"])

    p = add_command(sub, "quickstart", help="the built-in demo: a 36-run grid on digits, SPPs "
                    "and the report",
                    description="Run the quickstart grid (NF-ResNet vs BN-ResNet, no clipping "
                    "/ global norm / AGC, batch 32 and 512, 3 seeds, on scikit-learn's digits), "
                    "plot signal propagation at init, write the report.")
    add_run_options(p)
    add_rerun_option(p)
    p.set_defaults(func=handlers["quickstart"], workers=2)



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



def build_parser(handlers: Handlers) -> argparse.ArgumentParser:
    """The command line; ``handlers`` maps each command to the function that runs it
    (``args.func``)."""
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
    p.set_defaults(func=handlers["models"])

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
    add_model_data_options(
        p, set_help="model option override, e.g. width_mult=0.25 or depths=[8,8,8,8]")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="shape of the input batch (default 8,3,128,128: about ten seconds on "
                   "two CPU cores for a ResNet-50 pair; a preset has its own)")
    p.add_argument("--seeds", type=int, default=None,
                   help="fresh init + fresh batch per seed (default 3; a preset: its own)")
    p.add_argument("--out", default=f"{DEFAULT_OUT}/spp", metavar="DIR",
                   help="output directory")
    p.set_defaults(func=handlers["spp"])

    add_coord_check_command(sub, handlers)
    add_grid_commands(sub, handlers)

    p = add_command(sub, "export", help="export a grid to TensorBoard (scalars + HParams)")
    p.add_argument("format", choices=["tensorboard"], help="the export format")
    p.add_argument("dir", metavar="GRID", help="a grid folder (<out>/<grid>)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="TensorBoard log dir (default: GRID/tensorboard); exporting again "
                        "adds the runs finished since")
    p.add_argument("--live", type=float, default=None, metavar="SECONDS",
                   help="export again every SECONDS while runs are queued or running")
    p.set_defaults(func=handlers["export"])
    return parser

