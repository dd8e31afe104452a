"""Downstream evaluation: foreign-checkpoint import, classification, segmentation and optical flow."""
