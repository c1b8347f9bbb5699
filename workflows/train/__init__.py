"""Fine-tuning sentence embedders on Ray Train.

``config`` (TrainConfig), ``mixture`` (data loading, checks and the per-step schedule, no Ray),
``losses`` (objectives), ``loop`` (the per-worker Ray Train loop), ``export`` (model folder and
card), ``run`` (``run_train``, the stage entry point).
"""
