"""Where training runs: the Trainer's arguments and DeepSpeed ZeRO on GPUs or several ranks."""
import os
from pathlib import Path

import torch
from transformers import TrainingArguments

from oml import distributed
from oml.training.config import TrainingConfig


def training_arguments(config: TrainingConfig, output_dir: Path, report_to: str = "none",
                       run_name: str | None = None) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.num_train_epochs,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="constant",
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        save_strategy="no",
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must reach TrainingProgress, not be hidden by an average
        include_num_input_tokens_seen="non_padding",  # for tokens/s and model FLOP utilisation
        disable_tqdm=True,
        report_to=report_to,
        run_name=run_name,
        seed=config.seed,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed_config(config.deepspeed_stage) if uses_deepspeed(config.deepspeed_stage) else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def uses_deepspeed(stage: int) -> bool:
    """DeepSpeed ZeRO when several ranks or a GPU are there; a single CPU process gains nothing from it."""
    return stage > 0 and (distributed.world_size() > 1 or torch.cuda.is_available())


def can_share_prefix(stage: int) -> bool:
    """Whether a batch's shared prefix may run as a forward call of its own: not where ranks must run
    the same forward calls in step (ZeRO-3 gathers each layer's weights from all ranks in every
    call, and a rank whose batch shares no prefix makes one call fewer), nor under plain DDP (one
    forward call per backward)."""
    return distributed.world_size() == 1 or (uses_deepspeed(stage) and stage < 3)


def deepspeed_config(stage: int) -> dict:
    """ZeRO config; "auto" values are filled in by the Trainer from its own arguments."""
    if distributed.world_size() == 1:  # launched with plain `python`: emulate a one-rank launcher
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(distributed.free_port())
    return {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
