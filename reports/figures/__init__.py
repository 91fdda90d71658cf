"""The report's figures, one module per figure family; each plot function returns a Figure.

    style       labels, names of settings, palettes, axes helpers, the figure style
    frames      derived columns, varied axes, seed summaries, which runs a panel shows
    spp         plot_spp: signal propagation at init (paper A, Figure 1 style)
    stability   plot_stability_heatmap: clipping threshold x batch size
    accuracy    plot_accuracy_vs_batch: accuracy against batch size or another setting
    curves      plot_training_curves: loss and test accuracy over steps
    gradients   plot_gradient_heatmap: gradient norm per block over steps
    clipping    plot_agc_clip_fraction: the share of units AGC clips, per block
    alpha       plot_alpha_sweep (and spp_slopes): variance growth and accuracy against alpha
    gains       plot_gains: SkipInit gains over training

The grid figures read only the frames of ``ablations.store.load_results``; ``plot_spp`` reads
the frame of ``sigprop.spp``. Import from the modules (``from reports.figures.accuracy import
plot_accuracy_vs_batch``): the package re-exports nothing, so importing one figure does not
import the others.
"""
