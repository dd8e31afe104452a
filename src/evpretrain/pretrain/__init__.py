"""Pre-training: the dataset over an event store (``data``), the stage-1 masks and patch targets (``masking``),
and the heads, losses and stages of the three-stage method."""
