"""Embeddings and predictions of any checkpoint on any recording: ``load_model``, then ``embed`` or ``predict``
(``evpretrain.inference.model``); what a checkpoint records for it (``evpretrain.inference.spec``); the files the
``embed`` and ``predict`` commands write (``evpretrain.inference.outputs``).

Names load lazily, so that the training code can import ``evpretrain.inference.spec`` without torch models.
"""

from evpretrain.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "InferenceModel": "model",
        "load_model": "model",
        "InferenceSpec": "spec",
        "Representation": "spec",
    },
)
