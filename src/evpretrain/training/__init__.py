"""The training loop shared by the pre-training stages and downstream fine-tuning.

``train(model, step_fn, dataset, config, out_dir)`` runs AdamW on a per-step cosine schedule, resumes exactly
from ``out_dir/resume.pt``, stops on a non-finite loss, runs under DDP when launched with several processes,
and writes ``out_dir/metrics.json``. Hooks: ``MlflowHook`` (logging), ``KnnMonitor`` (representation quality).

Names load lazily so that ``import evpretrain.training.config`` stays torch-free (the pipeline checks every job's
settings while Snakemake plans, without torch).
"""

from evpretrain.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
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
    },
)
