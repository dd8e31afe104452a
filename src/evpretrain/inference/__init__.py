"""Embeddings and predictions of any checkpoint on any recording: ``load_model``, then ``embed`` or ``predict``
(``evpretrain.inference.model``); what a checkpoint records for it (``evpretrain.inference.spec``); the files the
``embed`` and ``predict`` commands write (``evpretrain.inference.outputs``).

Names load lazily, so that the training code can import ``evpretrain.inference.spec`` without torch models.
"""

from importlib import import_module

_EXPORTS = {
    "InferenceModel": "model",
    "load_model": "model",
    "InferenceSpec": "spec",
    "Representation": "spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evpretrain.inference' has no attribute {name!r}")
    return getattr(import_module(f"evpretrain.inference.{_EXPORTS[name]}"), name)
