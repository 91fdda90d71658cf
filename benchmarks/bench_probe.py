"""Training-step cost of a Probe: no probe vs recording every 10 steps vs every step, and of
the flight recorder (sigprop.recorder, on by default in every training run).

Each variant trains its own copy of the same small NF-ResNet on a fixed random batch (the
probe changes no number, so the three copies follow the same trajectory). The variants take
turns in blocks of ``--block`` steps, in an order shuffled every round, so load from other
processes hits all of them alike. A variant's ratio is the median over rounds of its block
time divided by the no-probe block time of the same round (paired, so slow drifts cancel).

Two clocks: wall time, and the CPU time of this process. On a machine shared with other jobs
the wall time mostly measures the neighbours; with one intra-op thread (the default here) the
CPU time is what the step itself costs, so its ratios are the ones to quote there.

Even the CPU time of a lone training step varies by +-10% from block to block on a shared VM,
so the end-to-end ratios resolve a few percent at best. A second phase therefore accounts for
the probe's own work directly: a probe subclass times every hook and callback it runs (CPU
time), and the report gives that time as a fraction of the step. It misses indirect costs
(autograd bookkeeping of the tensor hooks, cache effects), so it is a lower bound that the
end-to-end ratio brackets from above.

The "recorder" variant is a :class:`~sigprop.recorder.FlightRecorder` with the trainer's
defaults (50 early steps, a ring of 32) driven as the trainer drives it (``start_step``,
``before_update`` / ``after_update`` around the optimizer step, ``end_step``); its steps are
all past the early window after the warm-up, so it measures the ring, which records on every
step of a run, diverging or not. Nothing of it reaches the host (the benchmark checks).

    .venv/bin/python -m benchmarks.bench_probe [--rounds 30] [--block 10] [--threads 1] ...
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import sigprop
from benchmarks.timing import interleaved_rounds, timing_parser
from sigprop.probes import Probe
from sigprop.recorder import FlightRecorder

VARIANTS = ("no probe", "every 10", "every 1", "recorder")
TARGETS = {"every 10": 1.02, "every 1": 1.10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = timing_parser(
        __doc__, rounds=30, block=10, warmup=2, threads=1,
        block_help="steps per timed block (a multiple of 10)",
        threads_help="torch intra-op threads (default 1: on a shared 2-core machine more "
        "threads oversubscribe the cores and the timings become noise; 0 keeps torch's default)",
    )
    p.add_argument("--model", default="nf_resnet26")
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--px", type=int, default=32)
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (on CUDA the wall ratio is the one to quote)")
    return p.parse_args(argv)


class TimedProbe(Probe):
    """A Probe that adds up the CPU time spent in its own hooks and callbacks."""

    def __init__(self, *args, **kwargs):
        self.self_time = 0.0
        super().__init__(*args, **kwargs)

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.self_time += time.process_time() - start

        return wrapper

    def _on_forward_start(self, *args):
        return self._timed(super()._on_forward_start)(*args)

    def _on_forward_end(self, *args):
        return self._timed(super()._on_forward_end)(*args)

    def _on_backward_end(self):
        return self._timed(super()._on_backward_end)()

    def _make_output_hook(self, point):
        return self._timed(super()._make_output_hook(point))

    def _make_branch_hook(self, point):
        return self._timed(super()._make_branch_hook(point))

    def _make_grad_out_hook(self, point):
        return self._timed(super()._make_grad_out_hook(point))

    def _make_param_hook(self, q):
        return self._timed(super()._make_param_hook(q))


class TimedRecorder(TimedProbe, FlightRecorder):
    """A FlightRecorder that adds up the CPU time of its hooks and of the trainer's calls."""

    def before_update(self):
        return self._timed(super().before_update)()

    def after_update(self):
        return self._timed(super().after_update)()

    def end_step(self, *args):
        return self._timed(super().end_step)(*args)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.block % 10:
        raise SystemExit("--block must be a multiple of 10 so 'every 10' records once per block")
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = sigprop.create_model(
        args.model, width_mult=args.width_mult, stem="cifar", num_classes=10,
        skipinit_gain=1.0, stochdepth_rate=0.0,
    )
    device = torch.device(args.device)
    base = base.to(device)
    x = torch.randn(args.batch, 3, args.px, args.px).to(device)
    y = torch.randint(0, 10, (args.batch,)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    runs = {}
    for name in VARIANTS:
        model = copy.deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if name == "recorder":
            probe = FlightRecorder(model, early=50, ring=32)
        else:
            probe = None if name == "no probe" else Probe(model, every=int(name.split()[1]))
        runs[name] = {"model": model, "opt": opt, "probe": probe, "step": 0}
    not_clipped = torch.zeros((), device=device)

    def run_block(run: dict) -> tuple[float, float]:
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(args.block):
            if run["probe"] is not None:
                run["probe"].start_step(run["step"])  # as the trainer does
            loss = F.cross_entropy(run["model"](x), y)
            run["opt"].zero_grad(set_to_none=True)
            loss.backward()
            recorder = run["probe"] if isinstance(run["probe"], FlightRecorder) else None
            if recorder is not None:
                recorder.before_update()
            run["opt"].step()
            if recorder is not None:
                recorder.after_update()
                recorder.end_step(loss, 0.01, not_clipped)
            run["step"] += 1
        sync()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        return wall / args.block, cpu / args.block

    blocks = interleaved_rounds(
        {name: lambda name=name: run_block(runs[name]) for name in VARIANTS},
        args.rounds, args.warmup, args.seed,
    )
    times = {
        clock: {name: [pair[k] for pair in blocks[name]] for name in VARIANTS}
        for k, clock in enumerate(("wall", "cpu"))
    }

    print(
        f"model {args.model} width_mult {args.width_mult} batch {args.batch} px {args.px}, "
        f"{torch.get_num_threads()} thread(s), {args.rounds} rounds x {args.block} steps"
    )
    print(
        f"{'variant':<10} {'wall ms/step':>12} {'wall ratio':>11} {'cpu ms/step':>12} "
        f"{'cpu ratio [IQR]':>22} {'target':>7} {'recorded':>9}"
    )
    result = {}
    for name in VARIANTS:
        paired = {
            clock: [t / b for t, b in zip(times[clock][name], times[clock]["no probe"])]
            for clock in times
        }
        q1, cpu_ratio, q3 = _quartiles(paired["cpu"])
        result[name] = cpu_ratio
        result[f"{name} wall"] = statistics.median(paired["wall"])
        probe = runs[name]["probe"]
        if isinstance(probe, FlightRecorder):
            assert probe.host_transfers == 0  # the ring stayed on the device
            recorded = f"{len(probe.recorded_steps())} kept"
        else:
            recorded = "-" if probe is None else str(probe.records()["step"].nunique())
        target = f"{TARGETS[name]:.2f}" if name in TARGETS else "-"
        print(
            f"{name:<10} {statistics.median(times['wall'][name]) * 1e3:>12.2f} "
            f"{statistics.median(paired['wall']):>11.3f} "
            f"{statistics.median(times['cpu'][name]) * 1e3:>12.2f} "
            f"{cpu_ratio:>8.3f} [{q1:.3f}, {q3:.3f}] {target:>7} {recorded:>9}"
        )

    print("\nprobe self time (CPU time inside the probe's hooks and callbacks)")
    print(f"{'variant':<10} {'step ms':>8} {'probe ms/step':>14} {'fraction':>9}")
    for name in VARIANTS[1:]:
        model = copy.deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if name == "recorder":
            probe = TimedRecorder(model, early=50, ring=32)
        else:
            probe = TimedProbe(model, every=int(name.split()[1]))
        run = {"model": model, "opt": opt, "probe": probe, "step": 0}
        run_block(run)  # warm-up: builds the probe's cached index plans
        probe.self_time, step_cpu = 0.0, 0.0
        blocks = max(2, args.rounds // 3)
        for _ in range(blocks):
            step_cpu += run_block(run)[1]
        probe_ms = probe.self_time / (blocks * args.block) * 1e3
        step_ms = step_cpu / blocks * 1e3
        result[f"{name} self"] = probe_ms / step_ms
        print(f"{name:<10} {step_ms:>8.2f} {probe_ms:>14.3f} {probe_ms / step_ms:>9.4f}")
        probe.remove()
    return result


if __name__ == "__main__":
    main()
