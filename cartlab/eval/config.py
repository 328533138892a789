"""What `cartlab eval` runs: one typed config, checked before any model is loaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cartlab.config import Config, ConfigError, field
from cartlab.model.exits import EXITS
from cartlab.train.device import DEVICES


@dataclass
class EvalConfig(Config):
    checkpoint: str
    """A checkpoint folder, a run folder (its newest checkpoint), or an exported model folder."""
    tasks: list[str]
    """lm-eval task names or local tasks (data/tasks)."""
    num_fewshot: list[int] = field(default_factory=lambda: [0])
    """Few-shot counts, each >= 0."""
    n_loops: list[int] | None = field(None, none="null for the trained R")
    """Inference loop counts for CART, each >= 1."""
    exit: str | None = field(None, choices=lambda: EXITS, none="null for every token running n_loops")
    """A per-token exit rule for CART (`cartlab.model.exits`): kl, entropy, latent, argmax, learned."""
    exit_threshold: float | None = field(None, ge=0, none="null for the rule's default")
    """The exit rule's threshold."""
    db: str = "runs/results.db"
    """Results database of the run."""
    limit: int | None = field(None, ge=1, none="null for whole tasks")
    """Evaluate only the first N documents of each task (stored under a protocol that says so)."""
    batch_size: int = field(8, ge=1)
    fewshot_seed: int = field(1234, ge=0)
    """lm-eval's fewshot_random_seed: which examples a k-shot prompt draws (stored with the score)."""
    system_prompt: str | None = field(None, none="null for none")
    """lm-eval's system_instruction, prepended to every prompt (stored with the score)."""
    device: str = field("auto", choices=DEVICES)
    """'auto' picks what the hardware supports, as training does."""

    def validate(self) -> None:
        if not self.tasks:
            raise self.reject("tasks", "name at least one task")
        for i, k in enumerate(self.num_fewshot):
            if k < 0:
                raise ConfigError.value(f"num_fewshot[{i}]", k, "must be >= 0")
        for i, r in enumerate(self.n_loops or []):
            if r < 1:
                raise ConfigError.value(f"n_loops[{i}]", r, "must be >= 1")
        if self.exit_threshold is not None and self.exit is None:
            raise self.reject("exit_threshold", "a threshold needs an exit rule: give --exit too")
        if not Path(self.checkpoint).exists():
            raise self.reject("checkpoint", "no such checkpoint or run folder")
