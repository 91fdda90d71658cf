"""GPU verification in one command: ``python -m benchmarks.gpu --out DIR``.

Within about ten minutes on one GPU it writes ``DIR/gpu_report.json`` and
``DIR/gpu_report.md`` (one Markdown table per section):

1. ``tests``: the CUDA tests (``pytest -m cuda``);
2. ``agc``: AGC on NFNet-F0's parameter set: the ``_foreach_mul_`` floor, the eager path, the
   compiled (fused) path and the per-parameter loop, plus the fused-vs-eager difference
   (``benchmarks/bench_agc.py``);
3. ``memory``: peak GPU memory of one training step of each distinct batch-4096 run of the
   shipped grids (synthetic data at the run's image size), without and with ``micro_batch``;
4. ``probe``: the probe's overhead recording every 10 steps and every step
   (``benchmarks/bench_probe.py``);
5. ``grid``: the shipped quickstart grid (synthetic data, 1 epoch) at 1, 2 and 4 runs per GPU,
   in runs per hour (the grid runner, as ``benchmarks/bench_runner.py`` drives it);
6. ``step``: a training step of sigprop's NF-ResNet-50 (gamma folded), its BN-ResNet-50 and,
   where timm is importable, timm's nf_resnet50 and resnet50, in float32 and bf16, with
   channels_last off and on, and compiled (``benchmarks/bench_timm.py``'s step).

Sections run in that order while the time budget (``--budget-s``) lasts; a section that does
not fit is recorded as skipped, one that fails as its error (the others still run). Without
CUDA it prints one line and exits 2. ``--allow-cpu`` runs every section at toy sizes on the CPU
(a smoke test of this script, not a measurement). Exit status: 0 when every section ran and the
CUDA tests passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from sigprop.files import writable_dir_error

ROOT = Path(__file__).resolve().parent.parent
SECTION_ORDER = ("tests", "agc", "memory", "probe", "grid", "step")
MICRO_BATCH = 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_report.json / gpu_report.md")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="stop starting sections once this much time has gone (default 540)")
    p.add_argument("--sections", default=",".join(SECTION_ORDER),
                   help="comma-separated subset (run in the order given)")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Context:
    """Where and how big: the real sizes on CUDA, toy sizes for the CPU smoke run."""

    def __init__(self, device: torch.device, budget_s: float):
        self.device = device
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------- sections
def section_tests(ctx: Context) -> dict:
    """The ``cuda``-marked tests, in a child pytest."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:xdist", "-q", "-rs",
           "-p", "no:cacheprovider", str(ROOT / "tests")]
    timeout = max(30.0, min(180.0, ctx.left() - 60))
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"pytest -m cuda took longer than {timeout:.0f}s"}
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                   "\n".join(tail)):
        counts["error" if word.startswith("error") else word] += int(number)
    # pytest exits 5 when nothing was collected: no cuda test is a failure of this kit
    ok = done.returncode == 0 and counts["passed"] > 0
    return {"command": " ".join(cmd[1:]), "returncode": done.returncode, **counts, "ok": ok,
            "output_tail": tail}


def section_agc(ctx: Context) -> dict:
    from benchmarks.bench_agc import materialize, measure
    from sigprop.clipping import adaptive_clip_grad_, fused_agc_available

    model = "nfnet_f0" if ctx.cuda else "nf_resnet26"
    device = str(ctx.device)
    fused = fused_agc_available(ctx.device)
    result: dict = {"model": model, "lambda": 0.01, "fused_available": fused}
    if fused and ctx.left() < 240:  # compiling F0's clip can take minutes
        fused, result["fused_skipped"] = False, "time budget"
    if fused:
        # equality first, on fresh copies: fused against eager
        eager_params, fused_params = materialize(model, 1, device), materialize(model, 1, device)
        start = time.perf_counter()
        adaptive_clip_grad_(fused_params, 0.01, fused=True)
        ctx.sync()
        result["fused_first_call_s"] = time.perf_counter() - start  # includes compiling
        fused = fused_agc_available(ctx.device)  # False if compiling failed (eager fallback)
        result["fused_compiled"] = fused
        adaptive_clip_grad_(eager_params, 0.01, fused=False)
        worst = max(float((f.grad - e.grad).abs().max() / e.grad.abs().max().clamp_min(1e-30))
                    for f, e in zip(fused_params, eager_params))
        result["fused_vs_eager_max_rel_diff"] = worst
        del eager_params, fused_params
    params = materialize(model, 0, device)
    result["tensors"] = len(params)
    result["values_M"] = sum(p.numel() for p in params) / 1e6
    rounds = 20 if ctx.cuda else 3
    times = measure(params, 0.01, rounds, 3 if ctx.cuda else 1, 0, stack=False, fused=fused)
    medians = {name: statistics.median(t) for name, t in times.items()}
    floor = medians["foreach_mul_ floor"]
    result["rows"] = [{"variant": name, "median_ms": m * 1e3, "x_floor": m / floor}
                      for name, m in medians.items()]
    result["loop_over_eager"] = medians["per-param loop"] / medians["sigprop AGC"]
    if fused:
        result["loop_over_fused"] = medians["per-param loop"] / medians["sigprop AGC fused"]
    return result


STEP_MODELS = {
    # label: (library, model, overrides)
    "sigprop nf_resnet50": ("sigprop", "nf_resnet50", {"stochdepth_rate": 0.0,
                                                       "fold_gamma": True}),
    "sigprop bn_resnet50_v1": ("sigprop", "bn_resnet50_v1", {}),
    "timm nf_resnet50": ("timm", "nf_resnet50", {}),
    "timm resnet50": ("timm", "resnet50", {}),
}


def section_step(ctx: Context) -> dict:
    from benchmarks.bench_timm import (
        StepSettings,
        block_timer,
        import_timm,
        sigprop_model,
        timm_model,
        training_step,
    )
    from benchmarks.timing import interleaved_rounds

    have_timm = import_timm() is not None
    models = {k: v for k, v in STEP_MODELS.items() if v[0] == "sigprop" or have_timm}
    if not ctx.cuda:  # smoke run: the same code on toy models
        tiny = {"width_mult": 0.125, "depths": [1, 1, 1, 1]}
        models = {k: ("sigprop", name, {**kw, **tiny})
                  for k, (lib, name, kw) in models.items() if lib == "sigprop"}
    batch, px = (64, 192) if ctx.cuda else (2, 32)
    block, rounds = (5, 3) if ctx.cuda else (1, 1)
    settings_list = []
    for dtype in ("float32", "bfloat16"):
        for channels_last in (False, True):
            settings_list.append((dtype, channels_last, False))
    # compiling costs ~a minute per model: only in bf16 + channels_last, the GPU default
    if ctx.cuda:
        settings_list.append(("bfloat16", True, True))
    rows = []
    for dtype, channels_last, compiled in settings_list:
        if ctx.left() < (150 if compiled else 30):
            rows.append({"dtype": dtype, "channels_last": channels_last, "compile": compiled,
                         "skipped": "time budget"})
            continue
        settings = StepSettings(
            batch=batch, px=px, device=str(ctx.device), channels_last=channels_last,
            amp_dtype=None if dtype == "float32" else torch.bfloat16, compile=compiled,
        )
        chosen = models
        if compiled:  # compile only sigprop's two models: the comparison that matters here
            chosen = {k: v for k, v in models.items() if v[0] == "sigprop"}
        steps = {}
        for label, (library, name, overrides) in chosen.items():
            torch.manual_seed(0)
            build = sigprop_model if library == "sigprop" else timm_model
            steps[label] = block_timer(training_step(*build(name, overrides), settings),
                                       block, str(ctx.device))
        start = time.perf_counter()
        times = interleaved_rounds(steps, rounds, 1, 0)
        row = {"dtype": dtype, "channels_last": channels_last, "compile": compiled,
               "wall_s": time.perf_counter() - start}
        for label, values in times.items():
            row[f"{label} ms"] = statistics.median(values) * 1e3
        nf = "sigprop nf_resnet50"
        for other in ("sigprop bn_resnet50_v1", "timm nf_resnet50"):
            if other in times:
                paired = [a / b for a, b in zip(times[nf], times[other])]
                row[f"nf / {other.split()[-1]} ({other.split()[0]})"] = statistics.median(paired)
        rows.append(row)
        del steps
        if ctx.cuda:
            torch.cuda.empty_cache()
    return {"batch": batch, "px": px, "timm": have_timm, "rows": rows}


def section_probe(ctx: Context) -> dict:
    from benchmarks import bench_probe

    if ctx.cuda:
        argv = ["--device", "cuda", "--width-mult", "1.0", "--batch", "128", "--px", "64",
                "--rounds", "8", "--block", "10", "--threads", "0"]
    else:
        argv = ["--rounds", "2", "--block", "10", "--warmup", "0", "--batch", "2",
                "--px", "16", "--width-mult", "0.125"]
    with _quiet():
        result = bench_probe.main(argv)
    return {"argv": argv, **result}


def section_grid(ctx: Context) -> dict:
    from ablations.executors import LocalExecutor
    from ablations.runner import run_grid
    from ablations.spec import expand, load_spec

    overrides = ["data=synthetic", "epochs=1"]
    if not ctx.cuda:
        overrides += ["train_size=64", "test_size=32", "batch_size=32", "probe_every=0"]
    spec = load_spec(ROOT / "ablations" / "grids" / "quickstart.toml", overrides)
    runs = len(expand(spec))
    rows = []
    for per_gpu in (1, 2, 4):
        if ctx.left() < 60:
            rows.append({"runs_per_gpu": per_gpu, "skipped": "time budget"})
            continue
        if ctx.cuda:
            executor = LocalExecutor(1, "cuda", runs_per_gpu=per_gpu)
        else:
            executor = LocalExecutor(min(per_gpu, 2), "cpu")
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            outcome = run_grid(spec, out, executor, stream=io.StringIO())
            wall = time.perf_counter() - start
        rows.append({"runs_per_gpu": per_gpu, "slots": len(executor.slots()), "wall_s": wall,
                     "runs_per_hour": 3600 * runs / wall, "ended": dict(outcome.counts)})
    return {"grid": "quickstart", "overrides": overrides, "runs": runs, "rows": rows}


def batch_4096_configs() -> list[tuple[str, dict]]:
    """One training config per distinct (model, image size) among the shipped grids' runs at
    batch 4096, switched to synthetic data of that image size."""
    from ablations.shipped import GRIDS_DIR
    from ablations.spec import expand, load_spec

    seen: dict[str, tuple[str, dict]] = {}
    for path in sorted(GRIDS_DIR.glob("*.toml")):
        for run in expand(load_spec(path)):
            config = run.config
            if config["batch_size"] != 4096:
                continue
            key = json.dumps([config["model"], config["image_size"]], sort_keys=True)
            seen.setdefault(key, (path.stem, config))
    return list(seen.values())


def section_memory(ctx: Context) -> dict:
    from sigprop.train import TrainConfig, _Run

    rows = []
    for grid, config in batch_4096_configs():
        batch = 4096 if ctx.cuda else 64
        micro = MICRO_BATCH if ctx.cuda else 16
        for micro_batch in (None, micro):
            if ctx.left() < 20:
                rows.append({"grid": grid, "model": config["model"]["name"],
                             "micro_batch": micro_batch, "skipped": "time budget"})
                continue
            settings = {
                **config, "data": "synthetic", "data_dir": None, "train_size": batch,
                "test_size": 64, "batch_size": batch, "steps": 1, "epochs": None,
                "device": str(ctx.device), "micro_batch": micro_batch, "probe_every": 0,
                "eval_every": 0,
            }
            if not ctx.cuda:
                settings["image_size"] = min(settings["image_size"], 16)
            run_config = TrainConfig.from_dict(settings)
            row = {"grid": grid, "model": config["model"]["name"],
                   "width_mult": config["model"].get("width_mult"),
                   "image_size": run_config.image_size, "batch_size": batch,
                   "micro_batch": micro_batch}
            if ctx.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(ctx.device)
            try:
                run = _Run(run_config, probe=None, progress=None)
                start = time.perf_counter()
                run.train_step()
                run.flush()
                ctx.sync()
                row["step_s"] = time.perf_counter() - start
                if ctx.cuda:
                    row["peak_GiB"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
                del run
            except torch.OutOfMemoryError:
                row["peak_GiB"] = "out of memory"
            rows.append(row)
    return {"micro_batch": MICRO_BATCH, "rows": rows}


# the step matrix goes last: it is the longest, and checks the budget between its settings
SECTIONS: dict[str, Callable[[Context], dict]] = {
    "tests": section_tests,
    "agc": section_agc,
    "memory": section_memory,
    "probe": section_probe,
    "grid": section_grid,
    "step": section_step,
}
MIN_SECONDS = {"tests": 30, "agc": 60, "step": 60, "probe": 40, "grid": 60, "memory": 30}


class _quiet:
    """Swallow a reused benchmark's own printing (its figures come back as a dict)."""

    def __enter__(self):
        self._stdout, sys.stdout = sys.stdout, io.StringIO()

    def __exit__(self, *exc):
        sys.stdout = self._stdout


# ----------------------------------------------------------------------------- report
def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# GPU report: {report['device']}", "",
             f"torch {report['torch']}, {report['started']}, {report['wall_s']:.0f} s", ""]
    for name, result in report["sections"].items():
        lines += [f"## {name}", ""]
        if "rows" in result:
            head = {k: v for k, v in result.items() if k != "rows"}
            if head:
                lines += [", ".join(f"{k}: {_cell(v)}" for k, v in head.items()), ""]
            lines += _table(result["rows"])
        else:
            flat = {k: v for k, v in result.items() if k not in ("output_tail", "traceback")}
            lines += _table([flat])
            if result.get("output_tail"):
                lines += ["", "```", *result["output_tail"], "```"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"benchmarks.gpu: no CUDA device here (torch {torch.__version__}); nothing "
              "measured", file=sys.stderr)
        return 2
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"benchmarks.gpu: unknown section(s) {', '.join(unknown)}; valid: "
              f"{', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    why = writable_dir_error(out)
    if why:
        print(f"benchmarks.gpu: cannot write to {out}: {why}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(device, args.budget_s)
    report = {
        "device": torch.cuda.get_device_name(device) if ctx.cuda else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "budget_s": args.budget_s,
        "smoke_on_cpu": not ctx.cuda,
        "sections": {},
    }
    ok = True
    for name in names:
        if ctx.left() < MIN_SECONDS[name]:
            report["sections"][name] = {"skipped": "time budget"}
            ok = False
            continue
        print(f"benchmarks.gpu: {name} ({ctx.left():.0f}s left)", flush=True)
        start = time.perf_counter()
        try:
            result = SECTIONS[name](ctx)
        except Exception as err:  # one failing section must not lose the others' figures
            result = {"error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc().splitlines()[-8:]}
        result["section_s"] = time.perf_counter() - start
        ok = ok and "error" not in result and result.get("ok", True)
        report["sections"][name] = result
        _write(out, report, ctx)  # keep what is measured even if a later section hangs
    _write(out, report, ctx)
    print(f"benchmarks.gpu: wrote {out / 'gpu_report.json'} and {out / 'gpu_report.md'}")
    return 0 if ok else 1


def _write(out: Path, report: dict, ctx: Context) -> None:
    report["wall_s"] = time.perf_counter() - ctx.start
    for name, text in (("gpu_report.json", json.dumps(report, indent=2, default=str)),
                       ("gpu_report.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


if __name__ == "__main__":
    sys.exit(main())
