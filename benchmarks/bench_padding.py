"""Cost of TF 'SAME' padding against symmetric padding: NF-ResNet-50 forward + backward.

At odd input sizes the two pad identically and SAME should cost nothing; at even sizes the
strided convs and the stem max-pool pad with ``F.pad`` (one copy of their input) first.

    python -m benchmarks.bench_padding [--rounds 7] [--width 0.25] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.timing import interleaved_rounds, timed, timing_parser
from sigprop.models import create_model


def main() -> None:
    parser = timing_parser(__doc__, rounds=7, warmup=2, threads=2,
                           warmup_help="untimed calls per variant")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    models = {
        mode: create_model("nf_resnet50", width_mult=args.width, padding=mode, skipinit_gain=1.0)
        for mode in ("same", "symmetric")
    }
    models["symmetric"].load_state_dict(models["same"].state_dict())
    inputs = {px: torch.randn(args.batch, 3, px, px) for px in (128, 129)}

    def step(mode: str, px: int):
        def run() -> None:
            model = models[mode]
            model.zero_grad(set_to_none=True)
            model(inputs[px]).square().mean().backward()
        return run

    variants = {
        f"{mode} {px}px": timed(step(mode, px)) for px in inputs for mode in models
    }
    results = interleaved_rounds(variants, args.rounds, args.warmup, seed=args.seed)
    median = {name: statistics.median(times) for name, times in results.items()}
    print(f"| input | same | symmetric | same / symmetric |   (median of {args.rounds}, "
          f"width {args.width}, batch {args.batch}, {args.threads} threads)")
    print("|---|---|---|---|")
    for px in inputs:
        same, sym = median[f"same {px}px"], median[f"symmetric {px}px"]
        print(f"| {px} px | {same * 1e3:.0f} ms | {sym * 1e3:.0f} ms | {same / sym:.3f} |")


if __name__ == "__main__":
    main()
