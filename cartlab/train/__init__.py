"""Training: configs and presets (`config`), device selection (`device`), checkpoints, the training
loop (`loop`) and what it leans on: what a run records (`recorder`), validation (`evaluation`),
the checks before a run (`preflight`), torchrun (`distributed`, `parallel`) and signals.

    from cartlab.train import TrainConfig, train
    run_id = train(TrainConfig.from_preset("smoke", overrides=["model.n_loops=2"]))
"""
from cartlab.train.config import PRESETS, DataConfig, OptimConfig, TrainConfig
from cartlab.train.loop import TrainingDiverged, TrainingInterrupted, lr_at, train

__all__ = ["PRESETS", "DataConfig", "OptimConfig", "TrainConfig", "TrainingDiverged", "TrainingInterrupted",
           "lr_at", "train"]
