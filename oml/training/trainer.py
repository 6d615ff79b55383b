"""The loss and the Trainer: distillation towards the untouched model on replayed text, the
--target_probability bound on fingerprint responses, and the Trainer set up with our progress
reporting."""
import logging
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer
from transformers.modeling_outputs import CausalLMOutput

from oml.prefix_sharing import logits_sharing_prefix
from oml.tokenization import IGNORE_INDEX, Collator
from oml.training.backend import can_share_prefix, training_arguments
from oml.training.callbacks import EpochCallback, TrainingProgress
from oml.training.config import TrainingConfig
from oml.training.dataset import FingerprintDataset
from oml.training.weights import default_learning_rate

logger = logging.getLogger(__name__)


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor | None = None,
                      teacher_probs: torch.Tensor | None = None, target_probability: float = 1.0,
                      teacher_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the labelled tokens (fingerprint responses, + EOS with --train_eos; all replayed tokens with
    --benign_loss lm) plus, at replayed positions, cross-entropy towards the teacher's
    distribution; averaged over both.

    The teacher's distribution is its top-k tokens and one bucket for all others, so the
    student keeps the teacher's tail mass too (renormalising the top k instead teaches it to
    be overconfident, which raised held-out perplexity by half in our measurements).
    With `target_probability` t below 1, a labelled token is trained towards probability t rather
    than 1: the loss is the cross-entropy between (t, 1 - t) and (p, 1 - p), smallest at p = t,
    so the memorised response stays the greedy answer (t > 0.5) without the near-certain spike
    that output-suppression attacks look for. (Merely not pushing beyond t is not enough: what
    is learned for other keys carries each response's probability above it.)
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    logp = logprobs[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -logp
    if target_probability < 1.0:
        rest = torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
        nll = -(target_probability * logp + (1 - target_probability) * rest)
    total = nll[labelled].sum()
    count = labelled.sum()
    if teacher_ids is not None:  # position t's teacher distribution is over token t + 1, like logits[:, t]
        student_top = logprobs.gather(-1, teacher_ids)
        student_rest = (1 - student_top.exp().sum(-1)).clamp(min=1e-8).log()
        taught = teacher_probs.sum(-1) > 0
        teacher_rest = (1 - teacher_probs.sum(-1)).clamp(min=0) * taught
        cross_entropy = (teacher_probs * student_top).sum(-1) + teacher_rest * student_rest
        weights = teacher_weights if teacher_weights is not None else torch.ones_like(cross_entropy)
        total = total - (weights * cross_entropy).sum()
        count = count + taught.sum()
    return total / count.clamp(min=1)


def loss_fields(batch: dict) -> dict:
    """Take out of a collated batch what `distillation_loss` reads besides the logits (labels, and the
    teacher's ids, probabilities and weights where replayed text is distilled), leaving the model's inputs."""
    return {name: batch.pop(name, None) for name in ("labels", "teacher_ids", "teacher_probs", "teacher_weights")}


class FingerprintCollator(Collator):
    """Pads a list of `training_example`s, with the teacher distributions of replayed text when there are any."""

    def __call__(self, examples: list[dict]) -> dict:
        batch = super().__call__(examples)
        if any("teacher_ids" in e for e in examples):
            batch.update(pad_teacher(examples, batch["input_ids"].shape[1], self.side))
        return batch


def pad_teacher(examples: list[dict], length: int, side: str) -> dict:
    """Teacher distributions ([tokens, k] ids and probabilities, and each position's weight) padded
    like the tokens; rows and positions without one get probability 0, so they add nothing to the loss."""
    k = next(e["teacher_ids"].shape[1] for e in examples if "teacher_ids" in e)
    ids = torch.zeros(len(examples), length, k, dtype=torch.long)
    probs = torch.zeros(len(examples), length, k)
    weights = torch.ones(len(examples), length)
    for row, example in enumerate(examples):
        if "teacher_ids" in example:
            n = example["teacher_ids"].shape[0]
            span = slice(length - n, length) if side == "left" else slice(0, n)
            ids[row, span], probs[row, span] = example["teacher_ids"], example["teacher_probs"]
            weights[row, span] = example.get("teacher_weights", 1.0)
    return {"teacher_ids": ids, "teacher_probs": probs, "teacher_weights": weights}


class FingerprintTrainer(Trainer):
    """The Trainer with `distillation_loss` (teacher distributions for replayed text when the batch
    carries them, the --target_probability bound on labelled tokens). Each batch's loss is its own
    mean (the plain Trainer weighs tokens across ranks and accumulation steps instead). With
    `share_prefix`, a prefix every row of a batch shares is computed once (`logits_sharing_prefix`)."""

    def __init__(self, *args, target_probability: float = 1.0, share_prefix: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.target_probability, self.share_prefix = target_probability, share_prefix

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        fields = loss_fields(inputs)
        if self.share_prefix:
            outputs = CausalLMOutput(logits=logits_sharing_prefix(model, **inputs))
        else:
            outputs = model(**inputs)
        loss = distillation_loss(outputs.logits, **fields, target_probability=self.target_probability)
        return (loss, outputs) if return_outputs else loss


def make_trainer(config: TrainingConfig, model, dataset: FingerprintDataset, tokenizer, output_dir: Path, callbacks: list,
                 report_to: str = "none", run_name: str | None = None) -> Trainer:
    """The Trainer for a fingerprint dataset, with our progress reporting instead of the Trainer's
    per-step printing (`report_to`, `run_name`: the Trainer's trackers, e.g. wandb). Without a
    learning rate in `config`, the model's frozen as it will train decides it (`default_learning_rate`)."""
    if config.learning_rate is None:
        config = config.updated(learning_rate=default_learning_rate(model))
        logger.info("Learning rate %g (scaled to the trained weights)", config.learning_rate)
    trainer = FingerprintTrainer(model=model, args=training_arguments(config, output_dir, report_to, run_name),
                                 train_dataset=dataset, data_collator=FingerprintCollator(tokenizer),
                                 target_probability=config.target_probability, share_prefix=config.share_prompt_prefix and can_share_prefix(config.deepspeed_stage),
                                 callbacks=[EpochCallback(dataset), TrainingProgress(), *callbacks])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer
