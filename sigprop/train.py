"""Train one model on one small data set with the NFNet recipe (facts file, section 6).

Recipe: SGD with Nesterov momentum 0.9; lr = base_lr * batch_size / 256 unless ``lr`` is given;
linear warmup, then cosine decay towards 0; label smoothing; gradient clipping of the raw
gradient (AGC, global norm or none, :mod:`sigprop.clipping`), THEN coupled L2 weight decay added
to the gradient of weights only (parameters with two or more dims: never gains, biases or skip
gains), then the momentum step (so SGD's own ``weight_decay`` stays 0); optional EMA of the
weights, used for evaluation when enabled.

Numbering: ``metrics.step`` is the 0-based index of the update (the loss is that of the forward
pass before it; probes see the same index through ``Probe.start_step``); ``evals.step`` is the
number of updates completed when the evaluation ran, so the last evaluation has
``step == total_steps``.

Determinism: on CPU two runs of the same config at the same torch thread count
(``torch.set_num_threads``; the grid runner fixes it per run, default 1, and records it) give
identical metrics (step_time aside); another thread count splits reductions differently and
changes the last bits, which a chaotic run can grow into a different outcome. A run stopped or
killed and resumed from its checkpoint at the same thread count ends with exactly the metrics
of an uninterrupted one. On CUDA bit-for-bit repeats need PyTorch's deterministic algorithms
(the runner's ``--deterministic``). All randomness comes from ``seed``: model init, dropout and
stochastic depth use the global torch RNG (forked for the run, so the caller's state is left
alone; its state is checkpointed), the data order and augmentation use their own generator
(also checkpointed).

Host syncs: losses and clip statistics stay on the device and move to the host in chunks (every
step on CPU, where a "sync" costs nothing; every ``SYNC_EVERY_CUDA`` steps on CUDA), so
divergence is detected within that many steps; ``step_time`` is host wall time (on CUDA it
includes queueing, not the kernels' completion, except at sync points).

Flight recorder (:mod:`sigprop.recorder`, on unless ``record_early = record_ring = 0`` or
``compile``): every step's per-block statistics stay in a device buffer (the first
``record_early`` steps, then a ring of the last ``record_ring``); a diverged run's result
carries them up to the diverged step (``TrainResult.flight``, one transfer), any other run's
never leave the device. The buffer is not checkpointed: a run resumed mid-way records from the
step it resumed at (a diverged run's record is kept in its final checkpoint).

This module is the loop: :func:`train` and the state it drives (``_Run``). Its parts live next
to it, one job each: the config in :mod:`sigprop.train_config`, the lr schedules in
:mod:`sigprop.schedule`, checkpoints in :mod:`sigprop.checkpoint`, the test-set pass in
:mod:`sigprop.evaluation`, and the result, live updates and progress in
:mod:`sigprop.train_result`; their names stay importable from here.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from sigprop.checkpoint import (
    CHECKPOINT_FORMAT,
    RESUME_FREE_FIELDS,
    atomic_save,
    read_checkpoint,
    restore_run,
    run_state,
)
from sigprop.clipping import GradClipper
from sigprop.data import BatchStream, load_dataset
from sigprop.errors import UserError
from sigprop.evaluation import evaluate
from sigprop.gains import ZeroGainCheck
from sigprop.schedule import SCHEDULES, exponential_lr, lr_at, scheduled_lr, warmup_steps
from sigprop.train_config import (
    DEFAULT_EPOCHS,
    DEFAULT_MODEL,
    DEFAULT_OMITTED_FIELDS,
    SEED_MAX,
    SYNTHETIC_TRAIN_SAMPLES,
    TRAIN_SAMPLES,
    UNSET_OMITTED_FIELDS,
    TrainConfig,
)
from sigprop.train_result import (
    EVAL_COLUMNS,
    METRIC_COLUMNS,
    LiveSink,
    LiveUpdate,
    ProgressArg,
    TrainResult,
    check_progress,
    close_bar,
    progress_bar,
    report_progress,
)

# The names this module has always offered, wherever they are defined now.
__all__ = [
    "CHECKPOINT_FORMAT", "DEFAULT_EPOCHS", "DEFAULT_MODEL", "DEFAULT_OMITTED_FIELDS",
    "EVAL_COLUMNS", "METRIC_COLUMNS", "RESUME_FREE_FIELDS", "SCHEDULES", "SEED_MAX",
    "SYNC_EVERY_CUDA", "SYNTHETIC_TRAIN_SAMPLES", "TRAIN_SAMPLES", "UNSET_OMITTED_FIELDS",
    "LiveSink", "LiveUpdate", "ProgressArg", "TrainConfig", "TrainResult", "atomic_save",
    "evaluate", "exponential_lr", "lr_at", "resolve_device", "train",
]

SYNC_EVERY_CUDA = 8


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here")
    return device



class _Run:
    """The state of one training run; :func:`train` drives it."""

    def __init__(self, config: TrainConfig, probe, progress: ProgressArg,
                 live: LiveSink | None = None):
        self.config = config
        self.progress = progress
        self.live = live
        self.live_sent = (0, 0, -1)  # metric rows, eval rows, last probe step sent
        # in this order: the model's init draws from the global RNG seeded in _build_model
        self._choose_device()
        self._load_data()
        self._build_model()
        self._build_optimizer()
        self._build_ema()
        self._attach_probes(probe)
        self._choose_forward()
        self._start_loop_state()

    # ------------------------------------------------------------------ setup steps
    def _choose_device(self) -> None:
        config = self.config
        self.device = resolve_device(config.device)
        cuda = self.device.type == "cuda"
        self.use_amp = config.amp if config.amp is not None else cuda
        self.amp_dtype = getattr(torch, config.amp_dtype)
        self.channels_last = config.channels_last if config.channels_last is not None else cuda
        self.sync_every = SYNC_EVERY_CUDA if cuda else 1

    def _load_data(self) -> None:
        """The data on the device, the batch stream, and the lengths they give the run."""
        config = self.config
        data = load_dataset(
            config.data, config.data_dir, config.train_size, config.test_size,
            config.data_seed, config.image_size,
        )
        self.data = data.to(self.device)
        self.stream = BatchStream(
            self.data.train_x, self.data.train_y, config.batch_size, seed=config.seed,
            augment=config.augment,
        )
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.total_steps = config.total_steps(len(self.data.train_y))
        self.warmup_steps = warmup_steps(config.warmup_fraction, self.total_steps)
        self.peak_lr = config.peak_lr()
        if config.eval_every is None:
            self.eval_every = self.steps_per_epoch
        else:
            self.eval_every = config.eval_every

    def _build_model(self) -> None:
        from sigprop.models import create_model

        config = self.config
        torch.manual_seed(config.seed)  # inside the caller's fork_rng
        model = create_model(config.model["name"], **config.model_overrides())
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        self.model = model

    def _build_optimizer(self) -> None:
        """SGD (its own weight decay 0: train_step adds it after clipping), the fp16 grad
        scaler, the clipper and the check on AGC-clipped zero gains."""
        config, model = self.config, self.model
        params = [p for p in model.parameters() if p.requires_grad]
        self.decay_params = [p for p in params if p.ndim > 1]
        self.optimizer = torch.optim.SGD(
            params, lr=self.peak_lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=0.0,
        )
        self.scaler = None
        if self.use_amp and self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.clipper: GradClipper = config.clip.clipper(model)
        self.gain_check = ZeroGainCheck(self.clipper)

    def _build_ema(self) -> None:
        model = self.model
        self.ema_model: nn.Module | None = None
        if self.config.ema_decay is not None:
            self.ema_model = copy.deepcopy(model)
            for p in self.ema_model.parameters():
                p.requires_grad_(False)
            self.ema_pairs = (
                [p for p in self.ema_model.parameters()], [p.detach() for p in model.parameters()]
            )
            self.ema_buffers = (list(self.ema_model.buffers()), list(model.buffers()))

    def _attach_probes(self, probe) -> None:
        """The caller's probe (or one built by its factory, or from ``probe_every``) and the
        flight recorder."""
        config, model = self.config, self.model
        # the fraction of units above lambda is the one this run's AGC acts on
        lam = config.clip.threshold if config.clip.mode == "agc" else 0.01
        self.probe = None
        self.owns_probe = False
        if probe is not None:
            is_instance = hasattr(probe, "start_step") and not isinstance(probe, type)
            self.probe = probe if is_instance else probe(model)
            self.owns_probe = self.probe is not probe
        elif config.probe_every > 0:
            from sigprop.probes import Probe

            self.probe = Probe(model, every=config.probe_every, agc_lambda=lam)
            self.owns_probe = True
        self.recorder = None
        if (config.record_early or config.record_ring) and not config.compile:
            from sigprop.recorder import FlightRecorder

            self.recorder = FlightRecorder(model, config.record_early, config.record_ring,
                                           slack=self.sync_every - 1, agc_lambda=lam)
        self.flight_frame: pd.DataFrame | None = None

    def _choose_forward(self) -> None:
        self.forward = self.model
        if self.config.compile:
            if self.probe is not None:
                # stacklevel: the caller of train(), through _Run.__init__ and this method
                warnings.warn("compile is off while probing: probe hooks would break the graph",
                              stacklevel=4)
            else:
                self.forward = torch.compile(self.model)

    def _start_loop_state(self) -> None:
        self.step = 0  # updates completed
        self.metric_rows: list[list] = []
        self.eval_rows: list[list] = []
        self.pending: list[tuple[int, float, float, torch.Tensor]] = []
        self.status = "running"
        self.diverged_step: int | None = None
        self.earlier_blocks = pd.DataFrame()
        self.last_eval_step = 0
        self.last_eval_row = 0  # metric rows already summarized by an evaluation

    # ------------------------------------------------------------------ one step
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def forward_backward(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss (detached), its gradient accumulated into ``.grad``: in one
        pass, or in ``micro_batch`` slices whose losses are weighted by their share of the
        batch (the label-smoothed loss is a mean over examples, so the sum is the full mean)."""
        size = self.config.micro_batch
        if size is None or size >= len(yb):
            pieces = [(xb, yb)]
        else:
            pieces = list(zip(xb.split(size), yb.split(size)))
        total = None
        for xs, ys in pieces:
            with self.autocast():
                logits = self.forward(xs)
            loss = F.cross_entropy(logits.float(), ys, label_smoothing=self.config.label_smoothing)
            if len(pieces) > 1:
                loss = loss * (len(ys) / len(yb))
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def train_step(self) -> None:
        config, step = self.config, self.step
        start = time.perf_counter()
        xb, yb = self.stream.next()
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        if self.probe is not None:
            self.probe.start_step(step)
        recorder = self.recorder
        if recorder is not None:
            recorder.start_step(step)
        loss = self.forward_backward(xb, yb)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the unscaled gradient
        self.gain_check.observe(step)
        stats = self.clipper()
        if config.weight_decay:
            pairs = [(p.grad, p.detach()) for p in self.decay_params if p.grad is not None]
            if pairs:
                grads, weights = zip(*pairs)
                torch._foreach_add_(list(grads), list(weights), alpha=config.weight_decay)
        lr = scheduled_lr(config.schedule, step, self.total_steps, self.peak_lr,
                          self.warmup_steps, config.lr_start)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if recorder is not None:
            recorder.before_update()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if recorder is not None:
            recorder.after_update()
            recorder.end_step(loss, lr, stats.clip_fraction)
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema_model is not None:
            with torch.no_grad():
                ema, live = self.ema_pairs
                torch._foreach_lerp_(ema, live, 1.0 - config.ema_decay)
                for mine, theirs in zip(*self.ema_buffers):
                    mine.copy_(theirs)
        values = torch.stack(
            [loss.detach(), stats.grad_norm.to(loss.device), stats.clip_fraction.to(loss.device)]
        )
        self.pending.append((step, lr, time.perf_counter() - start, values))
        self.step += 1

    def flush(self) -> None:
        """Move pending step statistics to the host; marks divergence."""
        if not self.pending:
            return
        host = torch.stack([v for *_, v in self.pending]).tolist()
        for (step, lr, step_time, _), (loss, grad_norm, clip_fraction) in zip(self.pending, host):
            self.metric_rows.append([
                step, (step + 1) / self.steps_per_epoch, loss, lr, grad_norm, clip_fraction,
                step_time,
            ])
            if not math.isfinite(loss) or loss > self.config.diverge_loss:
                self.status, self.diverged_step = "diverged", step
                break
        self.pending = []

    def run_eval(self) -> None:
        model = self.ema_model if self.ema_model is not None else self.model
        acc, loss = evaluate(
            model, self.data.test_x, self.data.test_y, self.config.eval_batch_size,
            self.autocast, self.channels_last,
        )
        losses = [row[2] for row in self.metric_rows[self.last_eval_row:]]
        train_loss = sum(losses) / len(losses) if losses else math.nan
        self.eval_rows.append([self.step, self.step / self.steps_per_epoch, acc, loss,
                               train_loss])
        self.last_eval_step, self.last_eval_row = self.step, len(self.metric_rows)

    def report(self, loss: float | None) -> None:
        if self.progress is not None:
            report_progress(self.progress, self.step, self.total_steps, loss)

    def send_live(self, final: bool = False) -> None:
        """The rows since the last update to the live tracker. Only called with no pending
        step statistics, so it never waits for the device beyond the probe's one transfer; a
        tracker that raises is dropped with a warning, the run goes on."""
        if self.live is None or self.pending:
            return
        try:
            if not (final or self.live.due()):
                return
            rows, evals, last_block = self.live_sent
            blocks = self.blocks()
            if len(blocks) and "step" in blocks:
                blocks = blocks[blocks["step"] > last_block]
                last_block = int(blocks["step"].max()) if len(blocks) else last_block
            update = LiveUpdate(
                step=self.step, total_steps=self.total_steps,
                metrics=pd.DataFrame(self.metric_rows[rows:], columns=METRIC_COLUMNS),
                evals=pd.DataFrame(self.eval_rows[evals:], columns=EVAL_COLUMNS),
                blocks=blocks.reset_index(drop=True), final=final,
            )
            self.live_sent = (len(self.metric_rows), len(self.eval_rows), last_block)
            self.live.write(update)
        except Exception as err:  # noqa: BLE001 - tracking must never fail the run
            warnings.warn(f"live tracker dropped: {type(err).__name__}: {err}", stacklevel=2)
            self.live = None

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return run_state(self)

    def load(self, state: dict, path: Path) -> None:
        restore_run(self, state, path)

    def blocks(self) -> pd.DataFrame:
        if self.probe is None:
            return self.earlier_blocks
        current = self.probe.records()
        if self.earlier_blocks.empty:
            return current
        return pd.concat([self.earlier_blocks, current], ignore_index=True)

    def flight(self) -> pd.DataFrame:
        """The flight record of a diverged run (empty otherwise); reads the device once."""
        from sigprop.recorder import empty_flight

        if self.flight_frame is None:
            if self.status != "diverged" or self.recorder is None:
                return empty_flight()
            self.flight_frame = self.recorder.flight(self.diverged_step)
        return self.flight_frame

    def result(self) -> TrainResult:
        metrics = pd.DataFrame(self.metric_rows, columns=METRIC_COLUMNS).astype({"step": "int64"})
        evals = pd.DataFrame(self.eval_rows, columns=EVAL_COLUMNS).astype({"step": "int64"})
        accs = evals["test_acc"]
        final = math.nan if self.status == "diverged" or accs.empty else float(accs.iloc[-1])
        best = math.nan if accs.empty else float(accs.max())
        warning = self.gain_check.warning(self.peak_lr)
        return TrainResult(
            status=self.status, diverged_step=self.diverged_step, metrics=metrics, evals=evals,
            final_acc=final, best_acc=best, blocks=self.blocks(), steps_done=self.step,
            total_steps=self.total_steps, config=self.config.to_dict(),
            warnings=[warning] if warning else [], gain_check=self.gain_check.summary(),
            test_images=int(self.data.test_y.shape[0]), flight=self.flight(),
        )


def train(
    config: TrainConfig | Mapping,
    probe=None,
    progress: ProgressArg = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    live: LiveSink | None = None,
) -> TrainResult:
    """Train ``config`` (a :class:`TrainConfig` or a dict for :meth:`TrainConfig.from_dict`).

    Args:
        probe: a ``sigprop.probes.Probe`` already attached to nothing yet, or a factory
            ``probe(model) -> Probe``; without one, ``config.probe_every > 0`` attaches
            ``Probe(model, every=probe_every, agc_lambda=<the run's AGC threshold, else 0.01>)``.
            Probes built here are removed at the end.
        progress: True shows a tqdm bar on stderr (steps, rate, time left, the last loss);
            a callable gets ``progress(steps_done, total_steps, loss)`` after every step (loss
            is None on steps whose loss has not reached the host yet); a tqdm-like object gets
            ``set_postfix(loss=...)`` and ``update(1)``; False or None: silent.
        checkpoint_path: where to save the run (every ``config.checkpoint_every`` steps and at
            the end); with ``resume`` and an existing file the run continues from it, and a
            finished run returns its stored result at once.
        stop_after: stop (status "stopped", checkpoint saved) once this many steps are done;
            resuming later finishes the run exactly as if it had not stopped.
        live: a :class:`LiveSink` (a TensorBoard or MLflow writer) that gets the new metric,
            evaluation and probe rows whenever it says it is due, and once more at the end;
            one that raises is dropped with a warning.

    Divergence ends the run with status "diverged"; it is not raised.
    """
    if isinstance(config, Mapping):
        config = TrainConfig.from_dict(config)
    config.validate()
    if stop_after is not None and stop_after < 0:
        raise UserError(f"stop_after must be >= 0, got {stop_after!r}")
    check_progress(progress)
    show_bar = progress is True
    if show_bar or progress is False:
        progress = None  # the bar is made once a resumed run knows its first step
    path = None if checkpoint_path is None else Path(checkpoint_path)
    device = resolve_device(config.device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        run = _Run(config, probe, progress, live)
        try:
            if path is not None and resume and path.is_file():
                run.load(read_checkpoint(path), path)
            if run.status == "stopped":
                run.status = "running"
            if show_bar:
                run.progress = progress_bar(run.total_steps, run.step,
                                            str(run.config.model.get("name")))
            _loop(run, path, stop_after)
        finally:
            if show_bar and run.progress is not None:
                bar, run.progress = run.progress, None
                close_bar(bar, run.status,
                          run.diverged_step if run.status == "diverged" else run.step)
            if run.recorder is not None:
                run.recorder.remove()  # its buffer stays readable for flight()
            if run.probe is not None and run.owns_probe:
                blocks = run.blocks()
                run.probe.remove()
                run.earlier_blocks, run.probe = blocks, None
        return run.result()


def _loop(run: _Run, path: Path | None, stop_after: int | None) -> None:
    config = run.config
    every_ckpt = config.checkpoint_every
    while run.status == "running" and run.step < run.total_steps:
        if stop_after is not None and run.step >= stop_after:
            run.flush()
            if run.status == "running":
                run.status = "stopped"
            break
        run.train_step()
        step = run.step
        due_eval = run.eval_every and step % run.eval_every == 0
        due_ckpt = path is not None and every_ckpt and step % every_ckpt == 0
        if len(run.pending) >= run.sync_every or due_eval or due_ckpt or step == run.total_steps:
            run.flush()
        if run.status != "running":
            break
        if due_eval:
            run.run_eval()
        last_loss = run.metric_rows[-1][2] if not run.pending and run.metric_rows else None
        run.report(last_loss)
        if run.live is not None:
            run.send_live()
        if due_ckpt:
            atomic_save(run.state(), path)
    run.flush()
    if run.status == "running":
        if run.last_eval_step != run.step:
            run.run_eval()
        run.status = "completed"
    run.send_live(final=True)
    if path is not None:
        atomic_save(run.state(), path)
