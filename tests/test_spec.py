import textwrap
from pathlib import Path

import pytest

from ablations.shipped import GRIDS_DIR, shipped_grids
from ablations.spec import (
    SpecError,
    apply_overrides,
    expand,
    load_spec,
    run_id,
    spec_from_dict,
)
from run_ablations import main
from tests.helpers import shipped_runs

BASE = {
    "data": "synthetic",
    "train_size": 256,
    "test_size": 64,
    "steps": 4,
    "model": {"name": "nf_resnet26", "stem": "cifar", "width_mult": 0.125, "num_classes": 10},
    "clip": {"mode": "none", "threshold": 0.04},
}


def spec(grid, **sections):
    return spec_from_dict({"name": "t", "base": BASE, "grid": grid, **sections})


def axes_of(runs):
    return [r.axes for r in runs]


def test_axes_combine_as_a_product():
    runs = expand(spec({"batch_size": [8, 16, 32], "seed": [0, 1]}))
    assert len(runs) == 6
    assert {(a["batch_size"], a["seed"]) for a in axes_of(runs)} == {
        (b, s) for b in (8, 16, 32) for s in (0, 1)
    }
    assert all(r.config["batch_size"] == r.axes["batch_size"] for r in runs)


def test_tied_axes_move_together():
    runs = expand(spec({"batch_size": [8, 64], "lr": [0.01, 0.08], "seed": [0, 1]},
                       tie={"scale": ["batch_size", "lr"]}))
    assert len(runs) == 4
    assert {(r.config["batch_size"], r.config["lr"]) for r in runs} == {(8, 0.01), (64, 0.08)}


def test_threshold_axis_does_not_duplicate_unclipped_runs():
    runs = expand(spec({"clip.mode": ["none", "norm", "agc"], "clip.threshold": [0.01, 0.1]}))
    modes = [r.config["clip"]["mode"] for r in runs]
    assert sorted(modes) == ["agc", "agc", "none", "norm", "norm"]
    none_run = next(r for r in runs if r.config["clip"]["mode"] == "none")
    assert "clip.threshold" not in none_run.axes


def test_when_condition_and_model_options_apply_per_model():
    runs = expand(spec(
        {"model.name": ["nf_resnet26", "bn_resnet26_v2"], "model.alpha": [0.1, 0.4],
         "clip.mode": ["none", "agc"]},
        when={"clip.mode": {"model.name": ["nf_resnet26"]}},
    ))
    bn = [r for r in runs if r.config["model"]["name"] == "bn_resnet26_v2"]
    nf = [r for r in runs if r.config["model"]["name"] == "nf_resnet26"]
    assert len(nf) == 4 and len(bn) == 1  # BN has no alpha and is only the unclipped line
    assert "alpha" not in bn[0].config["model"] and bn[0].config["clip"]["mode"] == "none"


def test_dotted_when_keys_are_read_like_quoted_ones():
    quoted = spec({"clip.mode": ["none", "agc"], "seed": [0, 1]},
                  when={"clip.mode": {"seed": [0]}})
    dotted = spec({"clip.mode": ["none", "agc"], "seed": [0, 1]},
                  when={"clip": {"mode": {"seed": [0]}}})
    assert quoted.when == dotted.when == {"clip.mode": {"seed": [0]}}
    assert len(expand(quoted)) == 3


def test_run_ids_are_stable_and_independent_of_axis_order():
    a = expand(spec({"batch_size": [8, 16], "seed": [0, 1]}))
    b = expand(spec({"seed": [1, 0], "batch_size": [16, 8]}))
    assert {r.run_id for r in a} == {r.run_id for r in b}
    assert len({r.run_id for r in a}) == 4
    config = a[0].config
    shuffled = dict(reversed(list(config.items())))
    assert run_id(shuffled) == run_id(config) == a[0].run_id
    assert run_id({**config, "device": "cuda"}) == a[0].run_id  # execution choice, not identity
    assert run_id({**config, "seed": 99}) != a[0].run_id


def test_set_overrides_replace_and_add_axes():
    s = spec({"batch_size": [8, 16]})
    s = apply_overrides(s, ["batch_size=32,64,128", "seed=0,1", "steps=2", "model.alpha=0.3"])
    assert s.grid["batch_size"] == [32, 64, 128] and s.grid["seed"] == [0, 1]
    assert s.fixed["steps"] == 2 and s.fixed["model.alpha"] == 0.3
    s = apply_overrides(s, ["batch_size=16", "model.depths=[1,1,1,1]", "data=synthetic"])
    assert s.grid["batch_size"] == [16]
    assert s.fixed["model.depths"] == [1, 1, 1, 1] and s.fixed["data"] == "synthetic"
    runs = expand(s)
    assert len(runs) == 2 and runs[0].config["model"]["depths"] in ([1, 1, 1, 1], (1, 1, 1, 1))


def test_data_profile_applies_for_its_data_set_and_set_wins_over_it():
    s = spec({"seed": [0]}, data_profiles={"synthetic": {"train_size": 128,
                                                        "model": {"width_mult": 0.25}}})
    run = expand(s)[0]
    assert run.config["train_size"] == 128 and run.config["model"]["width_mult"] == 0.25
    run = expand(apply_overrides(s, ["train_size=192"]))[0]
    assert run.config["train_size"] == 192 and run.config["model"]["width_mult"] == 0.25
    assert expand(apply_overrides(s, ["data=digits"]))[0].config["train_size"] == 256


@pytest.mark.parametrize(
    "grid, extra, message",
    [
        ({"lrr": [0.1]}, {},
         r"grid\.lrr: unknown key 'lrr' \(did you mean 'lr'\?\); valid keys: .*batch_size"),
        ({"model.alpah": [0.1]}, {}, r"no model has the option 'alpah'"),
        ({"clip.treshold": [0.1]}, {}, r"unknown clip option 'treshold'"),
        ({"batch_size": []}, {}, r"grid\.batch_size is an empty axis"),
        ({"batch_size": 8}, {}, r"grid\.batch_size must be a list"),
        ({"batch_size": [0]}, {}, r"batch_size"),
        ({"batch_size": ["big"]}, {}, r"batch_size"),
        ({"clip.mode": ["agc"], "clip.threshold": [-0.1]}, {}, r"threshold"),
        ({"clip.mode": ["clamp"]}, {}, r"mode"),
        ({"model.name": ["resnet9"]}, {}, r"unknown model 'resnet9'"),
        ({"seed": [0]}, {"tie": {"g": ["seed", "lr"]}}, r"tie\.g names lr"),
        ({"seed": [0]}, {"grdi": {}}, r"unknown spec section\(s\) grdi"),
    ],
)
def test_validation_errors_name_the_field(grid, extra, message):
    with pytest.raises(SpecError, match=message):
        expand(spec_from_dict({"name": "t", "base": BASE, "grid": grid, **extra}))


def write_spec(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(textwrap.dedent(body))
    return path


def test_cli_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    path = write_spec(tmp_path, """
        name = "bad"
        [base]
        batch_size = 0
        [grid]
        seed = [0, 1]
    """)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch_size" in err
    assert not out.exists()


def test_cli_bad_set_and_bad_toml(tmp_path, capsys):
    path = write_spec(tmp_path, 'name = "x"\n[grid]\nseed = [0]\n')
    assert main(["run", str(path), "--set", "nonsense", "--dry-run"]) == 2
    assert "--set expects key=value" in capsys.readouterr().err
    broken = write_spec(tmp_path, "name = \n")
    assert main(["run", str(broken), "--dry-run"]) == 2
    assert "invalid TOML" in capsys.readouterr().err


def test_dry_run_lists_runs(tmp_path, capsys):
    assert main(["run", "quickstart", "--dry-run", "--set", "seed=0,1"]) == 0
    out = capsys.readouterr().out
    assert "16 runs in grid quickstart" in out  # (3 NF clippings + BN) x 2 batches x 2 seeds


# the grids made for a CPU run on scikit-learn's digits as shipped; the others train on CIFAR-10
DIGITS_GRIDS = {"quickstart", "frontier_batch", "frontier_length"}


@pytest.mark.parametrize("name", shipped_grids())
def test_shipped_grids_expand_at_both_scales(name):
    runs = expand(load_spec(GRIDS_DIR / f"{name}.toml", ["data=synthetic"]))
    assert runs and all(r.config["data"] == "synthetic" for r in runs)
    shipped = "digits" if name in DIGITS_GRIDS else "cifar10"
    assert shipped_runs(name)[0].config["data"] == shipped


def test_agc_batch_grid_shape():
    runs = shipped_runs("agc_batch")
    nf = [r for r in runs if r.config["model"]["name"] == "nf_resnet26"]
    bn = [r for r in runs if r.config["model"]["name"] != "nf_resnet26"]
    # none, norm and AGC at paper B's five thresholds; BN: the unclipped reference only
    assert len(nf) == 7 * 4 * 3 and len(bn) == 4 * 3
    agc = {r.config["clip"]["threshold"] for r in nf if r.config["clip"]["mode"] == "agc"}
    assert agc == {0.01, 0.02, 0.04, 0.08, 0.16}


def readme_grid() -> str:
    """The example spec of the README's "Ablation grids" section, as written there."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(part for part in text.split("```toml\n")[1:]
                 if part.startswith('name = "my_grid"'))
    return block.split("```")[0]


def test_readme_example_grid_expands_to_its_intended_36_runs(tmp_path):
    path = tmp_path / "my_grid.toml"
    path.write_text(readme_grid())
    runs = expand(load_spec(path))
    nf = [r for r in runs if r.config["model"]["name"] == "nf_resnet26"]
    bn = [r for r in runs if r.config["model"]["name"] == "bn_resnet26_v2"]
    assert (len(runs), len(nf), len(bn)) == (36, 27, 9)
    clipping = {(r.config["clip"]["mode"], r.effective["clip.threshold"]) for r in nf}
    assert clipping == {("none", None), ("norm", 1.0), ("agc", 0.01)}
    # the [when] on clip.mode drops the tied threshold too: BN runs take both from the base,
    # never a threshold borrowed from the norm entry
    assert {(r.effective["clip.mode"], r.effective["clip.threshold"]) for r in bn} == {
        ("none", None)}
    assert all("clip.mode" not in r.axes and "clip.threshold" not in r.axes for r in bn)


def test_a_when_on_any_tied_key_applies_to_the_whole_tie():
    grid = {"model.name": ["nf_resnet26", "bn_resnet26_v2"], "clip.mode": ["none", "agc"],
            "clip.threshold": [0.5, 0.02]}
    tie = {"tie": {"clipping": ["clip.mode", "clip.threshold"]}}
    on_mode = expand(spec(grid, **tie, when={"clip.mode": {"model.name": ["nf_resnet26"]}}))
    on_threshold = expand(spec(grid, **tie,
                               when={"clip.threshold": {"model.name": ["nf_resnet26"]}}))
    assert [r.run_id for r in on_mode] == [r.run_id for r in on_threshold]
    assert len(on_mode) == 3  # NF x (none, agc 0.02), BN once with the base clipping
    bn = [r for r in on_mode if r.config["model"]["name"] == "bn_resnet26_v2"]
    assert [r.config["clip"] for r in bn][0]["mode"] == BASE["clip"]["mode"]


def test_effective_settings_give_the_peak_lr_and_the_clipping_as_applied():
    from ablations.keys import effective_settings

    runs = expand(spec({"batch_size": [64, 256], "clip.mode": ["none", "agc"],
                        "clip.threshold": [0.02]}))
    for run in runs:
        assert run.effective["lr"] == pytest.approx(0.1 * run.config["batch_size"] / 256)
        mode = run.config["clip"]["mode"]
        assert run.effective["clip.mode"] == mode
        assert run.effective["clip.threshold"] == (0.02 if mode == "agc" else None)
    given = effective_settings({**BASE, "lr": 0.3, "batch_size": 256})
    assert given["lr"] == 0.3


def test_dry_run_shows_the_values_each_run_uses(tmp_path, capsys):
    path = tmp_path / "my_grid.toml"
    path.write_text(readme_grid())
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out and "None" not in out
    lines = out.splitlines()
    header = next(line.split() for line in lines if line.split()[:1] == ["run_id"])
    assert header[header.index("model.name"):] == [
        "model.name", "clip.mode", "clip.threshold", "batch_size", "seed", "lr"]
    # read from the right: model.name, clip.mode, clip.threshold, batch_size, seed, lr
    bn = [line.split() for line in lines if " bn_resnet26_v2 " in line]
    # the BN reference takes the base's clipping: none, so no threshold follows the mode
    assert len(bn) == 9 and all(row[-4] == "none" for row in bn)
    unclipped = [line.split() for line in lines if " none " in line]
    assert len(unclipped) == 18 and all(row[-4] == "none" for row in unclipped)
    agc = [line.split() for line in lines if " agc " in line]
    assert len(agc) == 9 and all(row[-5:-3] == ["agc", "0.01"] for row in agc)
    lr_of = {int(row[-3]): float(row[-1]) for row in bn}
    assert lr_of == {256: 0.1, 1024: 0.4, 4096: 1.6}  # base_lr 0.1 x B / 256
    assert lines[-1] == "36 runs in grid my_grid"
