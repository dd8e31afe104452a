"""evpretrain: physics-inspired self-supervised pre-training for event cameras."""

__version__ = "0.1.0"
