"""Constants of the ablation runner, defined once here: run states, frontier cell statuses,
limits and the worker processes' allocator settings.

Standard library only and no imports from ``ablations``: the bottom layer, which the command
line reads without loading pandas or torch (tests/test_architecture.py). The Makefile reads
:data:`MALLOC_ENV` from this file too.
"""

# A run's state in its status.json; a run is a result when it is FINISHED.
STATES = ("queued", "running", "completed", "diverged", "failed")
FINISHED = ("completed", "diverged")
DAMAGED = "damaged"  # shown by status/report for a run whose files cannot be read

# A frontier cell's status (ablations.frontier): the SEARCHED ones ended with an answer
# (found: both sides of the edge probed; the other two end the search at a bound).
SEARCHED = ("found", "stable_to_lr_max", "unstable_at_lr_min")
CELL_STATUSES = (*SEARCHED, "failed", "incomplete")

MAX_RUNS = 10_000  # refuse bigger grids unless --max-runs says otherwise (README, store)
NAME_MAX = 255  # bytes in one path component (Linux, macOS): the grid's folder

# A run's length is one setting given one of two ways: a later layer's choice replaces both.
LENGTH_KEYS = ("epochs", "steps")

# glibc otherwise hands every large activation buffer back to the OS after each step and
# page-faults it in again on the next: half of a small CPU run's time went to the kernel
# (BENCHMARKS.md). Keeping freed memory in the heap makes the same run 2x faster, bit-identical.
# Set for worker processes (ablations.executors) and, through the Makefile, for `make` targets.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
