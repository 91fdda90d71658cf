"""The report's figures, one module per figure family; each plot function returns a Figure.

    style       labels, names of settings, palettes, axes helpers, the figure style
    frames      derived columns, varied axes, seed summaries, which runs a panel shows
    heatmap     the block x step log heatmap that gradients and forensics draw
    spp         plot_spp: signal propagation at init (paper A, Figure 1 style)
    coordcheck  plot_coord_data: mup's coordinate check, activation size against width
    stability   plot_stability_heatmap: clipping threshold x batch size
    accuracy    plot_accuracy_vs_batch: accuracy against batch size or another setting
    curves      plot_training_curves: loss and test accuracy over steps
    gradients   plot_gradient_heatmap: gradient norm per block over steps
    clipping    plot_agc_clip_fraction: the share of units AGC clips, per block
    alpha       plot_alpha_sweep (and spp_slopes): variance growth and accuracy against alpha
    gains       plot_gains: SkipInit gains over training
    frontier    plot_frontier, plot_frontier_accuracy: the stable batch-size x lr frontier
    forensics   plot_divergence_timeline: what happened before each divergence

The grid figures read only the frames of ``ablations.store.load_results``; ``plot_spp`` reads
the frame of ``sigprop.spp``, ``plot_coord_data`` that of ``sigprop.coordcheck``. ``from
reports.figures import plot_spp`` works for every plot function above; each loads its own
module on first use, so importing one figure does not import the others (nor matplotlib
before a figure is asked for).

Paper A (the SPP figure): Brock, De and Smith, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets", ICLR 2021, arXiv 2101.08692. Paper B (the clipping
figures): Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition
Without Normalization", ICML 2021, arXiv 2102.06171.
"""

from sigprop.lazy import lazy_getattr

# Public name -> the module (under reports.figures) that defines it.
_EXPORTS = {
    "plot_spp": ".spp", "plot_coord_data": ".coordcheck",
    "plot_stability_heatmap": ".stability", "plot_accuracy_vs_batch": ".accuracy",
    "plot_training_curves": ".curves", "plot_gradient_heatmap": ".gradients",
    "plot_agc_clip_fraction": ".clipping", "plot_alpha_sweep": ".alpha", "spp_slopes": ".alpha",
    "plot_gains": ".gains", "plot_frontier": ".frontier", "plot_frontier_accuracy": ".frontier",
    "plot_divergence_timeline": ".forensics",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
