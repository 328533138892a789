"""Training: configs and presets, device selection, checkpoints, the training loop.

    from cartlab.train import TrainConfig, train
    run_id = train(TrainConfig.from_preset("smoke", overrides=["model.n_loops=2"]))
"""
from cartlab.train.config import PRESETS, DataConfig, OptimConfig, TrainConfig
from cartlab.train.loop import TrainingDiverged, TrainingInterrupted, lr_at, train

__all__ = ["PRESETS", "DataConfig", "OptimConfig", "TrainConfig", "TrainingDiverged", "TrainingInterrupted",
           "lr_at", "train"]
