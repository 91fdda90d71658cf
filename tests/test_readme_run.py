"""The README's "One training run" snippet, as written there, run for two steps."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

# the module, not the package's `sigprop.train` (the function it exports)
trainer = importlib.import_module("sigprop.train")
README = Path(__file__).resolve().parents[1] / "README.md"


def one_run_snippet() -> str:
    section = README.read_text().split("### One training run\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_one_training_run_snippet_runs(tmp_path, monkeypatch):
    real_train, runs = trainer.train, []

    def two_steps(config, *args, **kwargs):
        runs.append(config)
        return real_train(config, *args, **{**kwargs, "stop_after": 2})

    # the snippet imports train when it runs, so it gets this one; its checkpoint lands here
    monkeypatch.setattr(trainer, "train", two_steps)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        namespace: dict = {}
        exec(compile(one_run_snippet(), "README.md: One training run", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    (config,) = runs
    config = trainer.TrainConfig.from_dict(config) if isinstance(config, dict) else config
    assert config.data in ("synthetic", "digits")  # built in: a new user has no data files
    result = namespace["result"]
    assert (result.status, result.steps_done) == ("stopped", 2)
    assert list(tmp_path.glob("*.pt"))  # the checkpoint it resumes from
