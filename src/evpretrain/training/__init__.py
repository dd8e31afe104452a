"""The training loop shared by the pre-training stages and downstream fine-tuning.

``train(model, step_fn, dataset, config, out_dir)`` runs AdamW on a per-step cosine schedule, resumes exactly
from ``out_dir/checkpoint.pt``, stops on a non-finite loss, runs under DDP when launched with several processes,
and writes ``out_dir/metrics.json``. Hooks: ``MlflowHook`` (logging), ``KnnMonitor`` (representation quality).
"""

from evpretrain.training.checkpoint import CHECKPOINT_NAME, METRICS_NAME, RESUME_NAME, load_checkpoint
from evpretrain.training.config import TrainConfig
from evpretrain.training.hooks import Hook, TrainState
from evpretrain.training.knn import KnnMonitor, knn_accuracy
from evpretrain.training.loop import NonFiniteLossError, ResumeError, train
from evpretrain.training.mlflow_hook import MlflowHook
from evpretrain.training.optim import (
    build_optimizer,
    cosine_schedule,
    layer_scales,
    param_groups,
    peak_lr,
)

__all__ = [
    "CHECKPOINT_NAME",
    "RESUME_NAME",
    "METRICS_NAME",
    "Hook",
    "KnnMonitor",
    "MlflowHook",
    "NonFiniteLossError",
    "ResumeError",
    "TrainConfig",
    "TrainState",
    "build_optimizer",
    "cosine_schedule",
    "knn_accuracy",
    "layer_scales",
    "load_checkpoint",
    "param_groups",
    "peak_lr",
    "train",
]
