"""The optimisation loop of a training run: steps (gradient accumulation, clipping), non-finite losses skipped
and counted, logging, checkpoints and validation, and resuming where a checkpoint left off."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from defectfill.errors import TrainingError
from defectfill.models import Models
from defectfill.step import DefectFillStep
from defectfill.training.checkpoints import checkpoint_step, save_checkpoint
from defectfill.training.settings import TrainingSettings
from defectfill.training.validation import Validation, log_validation

logger = logging.getLogger("defectfill")


class NonFiniteGuard:
    """Counts skipped non-finite steps and stops the run after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def check(self, accelerator, loss: torch.Tensor) -> bool:
        """True when this step's loss is finite on every process (a collective under DDP)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        logger.warning("non-finite loss: update skipped (%d in a row, %d in all)", self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            raise TrainingError(f"{self.in_a_row} non-finite losses in a row (--max_nonfinite_steps {self.limit}); "
                                "lower the learning rate or use bf16 instead of fp16")
        return False


class TrainingLoop:
    """The optimisation loop: steps, skips, logging, checkpoints and validation."""

    def __init__(self, accelerator, models: Models, settings: TrainingSettings, defectfill_step: DefectFillStep, optimizer,
                 dataloader, lr_scheduler, output_dir: Path):
        self.accelerator, self.models, self.settings, self.step = accelerator, models, settings, defectfill_step
        self.optimization, self.monitoring = settings.optimization, settings.monitoring
        self.optimizer, self.dataloader, self.lr_scheduler, self.output_dir = optimizer, dataloader, lr_scheduler, output_dir
        self.global_step, self.first_epoch, self.skip_batches = 0, 0, 0
        self.guard = NonFiniteGuard(self.optimization.max_nonfinite_steps)
        self.steps_per_epoch = math.ceil(len(dataloader) / self.optimization.gradient_accumulation_steps)
        self.history: list[dict[str, float]] = []

    def resume(self, path: Path | None) -> None:
        if path is None:
            return
        self.accelerator.print(f"resuming from {path}")
        self.accelerator.load_state(str(path))
        self.global_step = checkpoint_step(path)
        self.first_epoch = self.global_step // self.steps_per_epoch
        self.skip_batches = (self.global_step % self.steps_per_epoch) * self.optimization.gradient_accumulation_steps

    def trainable_parameters(self):
        models = [self.models.unet] + (self.models.text_encoders if self.optimization.train_text_encoder else [])
        return [p for m in models for p in m.parameters() if p.requires_grad]

    def run(self, bar, validation: Validation) -> None:
        epoch = self.first_epoch
        while self.global_step < self.optimization.max_train_steps:
            self.dataloader.set_epoch(epoch)
            batches = self.dataloader
            if epoch == self.first_epoch and self.skip_batches:
                batches = self.accelerator.skip_first_batches(self.dataloader, self.skip_batches)
            for batch in batches:
                if self.train_step(batch):
                    bar.update(1)
                    self.after_optimizer_step(validation)
                if self.global_step >= self.optimization.max_train_steps:
                    return
            epoch += 1

    def train_step(self, batch) -> bool:
        """One micro-batch; True when it completed an optimizer step."""
        models, accelerator = self.models, self.accelerator
        models.unet.train()
        if self.optimization.train_text_encoder:
            for encoder in models.text_encoders:
                encoder.train()
        with accelerator.accumulate(models.unet, *models.text_encoders):
            with self.step(batch) as output:  # backward inside: the [V*] capture records until it is done
                losses = output.losses
                if not self.guard.check(accelerator, losses["loss"]):
                    self.optimizer.zero_grad(set_to_none=True)
                    return False
                accelerator.backward(losses["loss"])
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.trainable_parameters(), self.optimization.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            return False
        self.global_step += 1
        if self.global_step % self.monitoring.logging_steps == 0 or self.global_step == self.optimization.max_train_steps:
            self.log(losses)
        return True

    def log(self, terms: dict[str, torch.Tensor]) -> None:
        values = {f"loss/{k}": v.detach().item() for k, v in terms.items()}
        values["lr/unet"] = self.lr_scheduler.get_last_lr()[0]
        if self.optimization.train_text_encoder:
            values["lr/text_encoder"] = self.lr_scheduler.get_last_lr()[1]
        values["skipped_nonfinite_steps"] = self.guard.total
        self.history.append({"step": self.global_step, **values})
        self.accelerator.log(values, step=self.global_step)

    def summary(self) -> dict:
        return {"global_step": self.global_step, "skipped_nonfinite_steps": self.guard.total,
                "last_logged": self.history[-1] if self.history else None}

    def after_optimizer_step(self, validation: Validation) -> None:
        monitoring, accelerator, step = self.monitoring, self.accelerator, self.global_step
        if monitoring.checkpointing_steps and step % monitoring.checkpointing_steps == 0:
            save_checkpoint(accelerator, self.output_dir, step, monitoring.checkpoints_total_limit)
        if monitoring.validation_steps and step % monitoring.validation_steps == 0 and step < self.optimization.max_train_steps:
            if accelerator.is_main_process:
                log_validation(accelerator, self.models, self.settings, validation, step, self.step)
