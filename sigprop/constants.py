"""Names shared by the library, the store's readers and the report, defined once here.

Torch-free and import-free, so the command line, ``ablations`` and ``reports`` read them
without loading the training code.
"""

# The clipping modes that use ``clip.threshold`` (sigprop.clipping); for mode "none" the
# threshold is not applied, and a grid axis over it collapses (ablations.spec).
THRESHOLD_MODES = ("norm", "agc")
# blocks.parquet ``stat`` of a block's 0-d parameter: "gain:skip_gain" (sigprop.probes)
GAIN_PREFIX = "gain:"
