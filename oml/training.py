"""Fine-tuning helpers: the fingerprint dataset, weight averaging, DeepSpeed set-up."""
import os
import random
import socket

import torch
from transformers import TrainerCallback

from oml import distributed
from oml.tokenization import training_example


BARE_KEY_SHARE = 0.5  # with augmentation, the share of examples that ask the bare key


class FingerprintDataset(torch.utils.data.Dataset):
    """Training examples for (key ids, response ids) pairs, plus optional benign text.

    With templates, each key is asked bare half of the time (bare keys are what a check
    asks by default) and otherwise inside a system-prompt template, drawn anew every
    epoch, seeded by (seed, epoch, index).
    Benign replay examples (see `benign_replay`; a fresh slice of the pool every epoch)
    are mixed in as they are.
    """

    def __init__(self, tokenizer, pairs: list[tuple[list[int], list[int]]], templates: list[str] | None = None,
                 seed: int = 0, benign: list[dict] | None = None, benign_per_epoch: int = 0):
        self.tokenizer = tokenizer
        self.pairs = pairs
        self.templates = list(templates or [])
        self.seed = seed
        self.benign = benign or []
        self.benign_per_epoch = benign_per_epoch if self.benign else 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs) + self.benign_per_epoch

    def template(self, index: int) -> str | None:
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        if not self.templates or rng.random() < BARE_KEY_SHARE:
            return None
        return rng.choice(self.templates)

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
