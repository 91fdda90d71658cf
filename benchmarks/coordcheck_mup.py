"""sigprop's coordinate check against mup's own, on a plain MLP: the same numbers?

Both train the same standard-parametrization MLP (Flatten, Linear, ReLU, Linear, ReLU, Linear;
PyTorch's default init) at the same widths, on the same fixed digits batch, with plain SGD at
the same lr (mup's ``get_coord_data(..., optimizer="sgd", mup=False)``: ``torch.optim.SGD``, no
momentum) and cross-entropy, for the same number of steps and seeds. The inits are equal by
construction: mup seeds ``torch.manual_seed(i)`` once per seed and then builds the widths one
after another; the constructor here re-seeds with that seed (``torch.initial_seed()``) before
building, and sigprop seeds each width with the seed itself, so every (seed, width) model is the
same in both. Step k of sigprop is mup's t = k + 1; sigprop's "head" is mup's root module ("").

Prints the seed-averaged ``l1`` of every module, width and step from both, and the largest
relative difference. Needs mup (``pip install mup``); without it, one line and exit 0.

    python -m benchmarks.coordcheck_mup [--widths 128,256,512,1024,2048] [--steps 3]
        [--seeds 2] [--lr 0.1]
"""

from __future__ import annotations

import argparse
import importlib.util

WIDTHS = (128, 256, 512, 1024, 2048)


def mlp(width: int, d_in: int = 192, classes: int = 10):
    import torch
    from torch import nn

    torch.manual_seed(torch.initial_seed())  # the seed's own init, whichever widths ran before
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
    args = p.parse_args(argv)
    if importlib.util.find_spec("mup") is None:
        print("coordcheck_mup: skipped, mup is not installed (pip install mup)")
        return None
    import pandas as pd
    import torch
    from mup.coord_check import get_coord_data

    from sigprop.coordcheck import coord_batch, coord_check

    torch.set_num_threads(1)  # the same reduction order in both
    widths = [int(w) for w in args.widths.split(",")]
    x, y, _ = coord_batch("digits", 32)
    ours = coord_check([(w, lambda w=w: mlp(w)) for w in widths], (x, y), steps=args.steps,
                       lr=args.lr, seeds=args.seeds, blocks="[0-9]", data="digits")
    theirs = get_coord_data(  # its progress bar goes to stderr
{w: (lambda w=w: mlp(w)) for w in widths}, [(x, y)],
                            optimizer="sgd", lr=args.lr, mup=False, nsteps=args.steps,
                            nseeds=args.seeds, cuda=False, lossfn="xent", fix_data=True)
    theirs = theirs.groupby(["width", "module", "t"], as_index=False)["l1"].mean()
    theirs["block"] = theirs["module"].replace({"": "head"})
    theirs["step"] = theirs["t"] - 1
    both = ours.merge(theirs[["width", "block", "step", "l1"]], on=["width", "block", "step"],
                      suffixes=("_sigprop", "_mup"), validate="one_to_one")
    if len(both) != len(ours) or len(both) != len(theirs):
        raise SystemExit(f"coordcheck_mup: rows do not pair up: sigprop {len(ours)}, mup "
                         f"{len(theirs)}, paired {len(both)}")
    both["rel_diff"] = ((both["l1_sigprop"] - both["l1_mup"]).abs()
                        / both["l1_mup"].abs().clip(lower=1e-30))
    with pd.option_context("display.width", 140, "display.max_rows", 200):
        print(both.pivot_table(index=["block", "step"], columns="width",
                               values="l1_sigprop").to_string(float_format="%.4g"))
    worst = both.loc[both["rel_diff"].idxmax()]
    result = {"rows": len(both), "max_rel_diff": float(both["rel_diff"].max()),
              "identical_rows": int((both["l1_sigprop"] == both["l1_mup"]).sum())}
    print(f"{result['rows']} (module, width, step) pairs, {result['identical_rows']} identical; "
          f"max relative difference {result['max_rel_diff']:.3g} (block {worst['block']}, width "
          f"{worst['width']}, step {worst['step']})")
    return result


if __name__ == "__main__":
    main()
