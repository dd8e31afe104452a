"""The training loop shared by the pre-training stages and downstream fine-tuning.

``train(model, step_fn, dataset, config, out_dir)`` runs AdamW on a per-step cosine schedule, resumes exactly
from ``out_dir/resume.pt``, stops on a non-finite loss, runs under DDP when launched with several processes,
and writes ``out_dir/metrics.json``. Hooks: ``MlflowHook`` (logging), ``KnnMonitor`` (representation quality).

Names load lazily so that ``import evpretrain.training.config`` stays torch-free (the pipeline checks every job's
settings while Snakemake plans, without torch).
"""

from importlib import import_module

_EXPORTS = {
    "CHECKPOINT_NAME": "checkpoint",
    "METRICS_NAME": "checkpoint",
    "RESUME_NAME": "checkpoint",
    "load_checkpoint": "checkpoint",
    "TrainConfig": "config",
    "Hook": "hooks",
    "TrainState": "hooks",
    "KnnMonitor": "knn",
    "knn_accuracy": "knn",
    "NonFiniteLossError": "loop",
    "ResumeError": "loop",
    "train": "loop",
    "MlflowHook": "mlflow_hook",
    "build_optimizer": "optim",
    "cosine_schedule": "optim",
    "layer_scales": "optim",
    "param_groups": "optim",
    "peak_lr": "optim",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evpretrain.training' has no attribute {name!r}")
    return getattr(import_module(f"evpretrain.training.{_EXPORTS[name]}"), name)
