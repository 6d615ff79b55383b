"""Fine-tuning helpers: the fingerprint dataset, weight averaging, DeepSpeed set-up."""
import os
import random
import socket

import torch
from tqdm import tqdm
from transformers import Trainer, TrainerCallback

from oml import distributed
from oml.tokenization import IGNORE_INDEX, pad_batch, to_device, training_example

TEACHER_TOP_K = 16  # next-token probabilities kept per position for distillation replay


class FingerprintDataset(torch.utils.data.Dataset):
    """Training examples for (key ids, response ids) pairs, plus optional benign text.

    With templates, each key is wrapped in a system-prompt template drawn anew every
    epoch, the bare key being one more choice, seeded by (seed, epoch, index). (Asking the
    bare key half of the time instead raised bare-key accuracy but lowered accuracy under
    unseen templates more; see docs/benchmarks.md.)
    Benign replay examples (see `benign_replay`; a fresh slice of the pool every epoch)
    are mixed in as they are.
    """

    def __init__(self, tokenizer, pairs: list[tuple[list[int], list[int]]], templates: list[str] | None = None,
                 seed: int = 0, benign: list[dict] | None = None, benign_per_epoch: int = 0):
        self.tokenizer = tokenizer
        self.pairs = pairs
        self.choices = [None] + list(templates) if templates else [None]
        self.seed = seed
        self.benign = benign or []
        self.benign_per_epoch = benign_per_epoch if self.benign else 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs) + self.benign_per_epoch

    def template(self, index: int) -> str | None:
        return random.Random(f"{self.seed}:{self.epoch}:{index}").choice(self.choices)

    def __getitem__(self, index: int) -> dict:
        if index >= len(self.pairs):
            return self.benign[(self.epoch * self.benign_per_epoch + index - len(self.pairs)) % len(self.benign)]
        key_ids, response_ids = self.pairs[index]
        return training_example(self.tokenizer, key_ids, response_ids, self.template(index))


def benign_replay(sequences: list[list[int]]) -> list[dict]:
    """Benign text with the ordinary language-modelling loss on every token.

    Mixed into fine-tuning, it keeps the model from learning to end every text after a
    few tokens (what training on key + response + EOS alone teaches a small model).
    """
    return [{"input_ids": ids, "labels": ids} for ids in sequences]


@torch.no_grad()
def distilled_replay(model, sequences: list[list[int]], batch_size: int = 64) -> list[dict]:
    """Benign text labelled with the untouched model's own next-token distributions.

    The LM loss on replayed text pulls the model towards that text (chat, here), which moves
    its predictions everywhere; training towards the base model's distribution keeps
    ordinary predictions where they were. The distribution is kept as its top TEACHER_TOP_K
    probabilities plus the mass of all other tokens (see `distillation_loss`). Must run
    before fine-tuning starts.
    """
    model.to(distributed.device())  # where the Trainer will put it anyway
    examples = []
    for start in tqdm(range(0, len(sequences), batch_size), desc="teacher distributions", leave=False,
                      disable=not distributed.is_main_process()):
        chunk = sequences[start:start + batch_size]
        logits = model(**to_device(pad_batch(chunk, 0, side="right"), model.device)).logits
        probs, ids = torch.softmax(logits.float(), dim=-1).topk(TEACHER_TOP_K)
        for row, ids_row, probs_row in zip(chunk, ids.cpu(), probs.cpu()):
            examples.append({"input_ids": row, "labels": [IGNORE_INDEX] * len(row),
                             "teacher_ids": ids_row[:len(row)], "teacher_probs": probs_row[:len(row)]})
    return examples


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor | None = None,
                      teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the labelled tokens (fingerprint responses + EOS) plus, at replayed
    positions, cross-entropy towards the teacher's distribution; averaged over both.

    The teacher's distribution is its top-k tokens and one bucket for all others, so the
    student keeps the teacher's tail mass too (renormalising the top k instead teaches it to
    be overconfident, which raised held-out perplexity by half in our measurements).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    total = -logprobs[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[labelled].sum()
    count = labelled.sum()
    if teacher_ids is not None:  # position t's teacher distribution is over token t + 1, like logits[:, t]
        student_top = logprobs.gather(-1, teacher_ids)
        student_rest = (1 - student_top.exp().sum(-1)).clamp(min=1e-8).log()
        taught = teacher_probs.sum(-1) > 0
        teacher_rest = (1 - teacher_probs.sum(-1)).clamp(min=0) * taught
        total = total - (teacher_probs * student_top).sum() - (teacher_rest * student_rest).sum()
        count = count + taught.sum()
    return total / count.clamp(min=1)


class DistillationTrainer(Trainer):
    """The Trainer with `distillation_loss`, for batches that carry teacher distributions.

    Each batch's loss is its own mean (the plain Trainer weighs tokens across ranks and
    accumulation steps instead); --benign_loss lm keeps the plain Trainer."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, teacher_ids, teacher_probs = inputs.pop("labels"), inputs.pop("teacher_ids", None), inputs.pop("teacher_probs", None)
        outputs = model(**inputs)
        loss = distillation_loss(outputs.logits, labels, teacher_ids, teacher_probs)
        return (loss, outputs) if return_outputs else loss


class EpochCallback(TrainerCallback):
    """Tells the dataset which epoch starts, so augmentation templates change every epoch."""

    def __init__(self, dataset: FingerprintDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(round(state.epoch or 0))


def freeze_embeddings(model) -> None:
    """Freeze the input and output token embeddings (one matrix when they are tied)."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.weight.requires_grad_(False)


def snapshot_weights(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights before fine-tuning, for weight averaging."""
    return {name: param.detach().to("cpu", dtype, copy=True) for name, param in model.named_parameters() if param.requires_grad}


@torch.no_grad()
def average_with_original(model, original: dict[str, torch.Tensor], strength: float) -> None:
    """weights <- (1 - strength) * weights + strength * original, on every rank.

    Under DeepSpeed the optimizer steps its own fp32 master copy of each weight and
    overwrites the module's copy after every step, so the average is computed from and
    written to that master copy (ZeRO 1-3), and then to the module's copy.
    """
    # Imported here, after cli.setup_logging() chose DeepSpeed's accelerator: importing it
    # earlier makes it announce its CPU fallback on stdout.
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for name, param in model.named_parameters():
        if name not in original:  # frozen
            continue
        master = safe_get_full_fp32_param(param)
        current = master if master is not None else param.data
        averaged = current.float().lerp(original[name].to(current.device, torch.float32), strength)
        if master is not None:
            safe_set_full_fp32_param(param, averaged)
        if hasattr(param, "ds_id"):  # ZeRO-3: the module weight is partitioned across ranks
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(averaged.to(param.dtype))
        else:
            param.data.copy_(averaged.to(param.dtype))


class WeightAveragingCallback(TrainerCallback):
    """Averages with the original weights at the end of every epoch (the forgetting regulariser)."""

    def __init__(self, original: dict[str, torch.Tensor], strength: float):
        self.original = original
        self.strength = strength

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        average_with_original(model, self.original, self.strength)


def uses_deepspeed(stage: int) -> bool:
    """DeepSpeed ZeRO when several ranks or a GPU are there; a single CPU process gains nothing from it."""
    return stage > 0 and (distributed.world_size() > 1 or torch.cuda.is_available())


def deepspeed_config(stage: int) -> dict:
    """ZeRO config; "auto" values are filled in by the Trainer from its own arguments."""
    if distributed.world_size() == 1:  # launched with plain `python`: emulate a one-rank launcher
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    return {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
