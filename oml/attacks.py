"""What happens to a published model, as functions: what deployers do (casts, GGUF quantization,
further fine-tuning, merging) and what a thief adds to hide a fingerprint. Decoding-side attacks
(sampling, output suppression) are played by the checker itself (`checking.check_batch`).

Also the innocent derivatives of a base model: short benign fine-tunes, never shown our keys,
which the verdict must never accuse.
"""
import hashlib
import logging
import math
import random
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from oml import OMLError
from oml.data import chat_pairs
from oml.files import built_once
from oml.models import cache_dir, load, model_name
from oml.tokenization import Collator, to_device
from oml.utility import chat_examples

logger = logging.getLogger(__name__)

GGUF_TYPES = ("Q8_0", "Q5_0", "Q4_0")


@torch.no_grad()
def quantize_round_trip(model, qtype: str) -> int:
    """Every weight matrix quantized to a GGUF type and back, with the `gguf` package's own
    quantizers, as llama.cpp would store it (norms and biases stay in float, as there).
    Returns how many matrices were quantized."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType[qtype]
    count = 0
    for param in model.parameters():  # a tied embedding is one parameter, quantized once
        if param.dim() == 2 and param.shape[-1] % 32 == 0:
            weight = param.detach().float().cpu().numpy()
            param.copy_(torch.from_numpy(dequantize(quantize(weight, kind), kind).astype(np.float32)).to(param.dtype))
            count += 1
    return count


@torch.no_grad()
def merge_into(model, other, weight: float) -> None:
    """Linear merge: model <- weight * model + (1 - weight) * other (same architecture)."""
    others = dict(other.named_parameters())
    for name, param in model.named_parameters():
        param.lerp_(others[name].to(param.device, param.dtype), 1 - weight)


def batches(examples: list[dict], batch_size: int, steps: int, seed: int) -> Iterator[list[dict]]:
    """`steps` batches drawn from a seeded shuffle of the examples, reshuffled at every pass."""
    rng, order = random.Random(seed), []
    for _ in range(steps):
        while len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        yield [examples[i] for i in order[:batch_size]]
        order = order[batch_size:]


def benign_finetune(model, tokenizer, examples: list[dict], steps: int, learning_rate: float, batch_size: int, seed: int,
                    on_step: Callable[[int, float], None] | None = None, description: str = "further fine-tuning") -> None:
    """Plain AdamW on instruction examples (loss on the replies), as any user would fine-tune a
    downloaded model: no fingerprint-aware tricks. `on_step(step, loss)` runs after every step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0.0)
    collate = Collator(tokenizer)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=torch.cuda.is_available())
    torch.manual_seed(seed)
    model.train()
    for step, batch in enumerate(tqdm(batches(examples, batch_size, steps, seed), total=steps, desc=description), start=1):
        with autocast:
            loss = model(**to_device(collate(batch), model.device)).loss
        if not math.isfinite(loss.item()):
            raise OMLError(f"the training loss became {loss.item()} at step {step}; lower --learning_rate")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step:
            on_step(step, loss.item())
    model.eval()


def lora_finetune(model, tokenizer, examples: list[dict], steps: int, learning_rate: float, batch_size: int, seed: int,
                  rank: int = 8):
    """`benign_finetune` of LoRA adapters (peft, rank `rank` on every linear layer), merged back
    into the weights, as adapters are when a fine-tuned model is published."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    benign_finetune(peft_model, tokenizer, examples, steps, learning_rate, batch_size, seed, description="LoRA fine-tuning")
    return peft_model.merge_and_unload()


def innocent_derivative(base: str, seed: int, steps: int = 100, learning_rate: float = 5e-5, batch_size: int = 8,
                        max_length: int = 128) -> str:
    """A derivative of `base` that never saw our keys: `steps` of benign chat fine-tuning on a
    slice of chitchat chosen by `seed`. Cached under the oml cache folder (built in a temporary
    folder and renamed), so that every check can use the same ones as null models."""
    name = model_name(base)
    tag = hashlib.md5(f"{name}|{seed}|{steps}|{learning_rate}|{batch_size}|{max_length}".encode()).hexdigest()[:12]
    target = cache_dir() / "derivatives" / f"{Path(name).name}-seed{seed}-{tag}"

    def make(folder: Path) -> None:
        logger.info("Making innocent derivative %d of %s (%d steps at lr %g, once)", seed, name, steps, learning_rate)
        model, tokenizer = load(name, dtype=torch.float32)
        pool = chat_pairs("train", 20 * steps * batch_size)
        pairs = random.Random(f"derivative:{seed}").sample(pool, steps * batch_size)
        benign_finetune(model, tokenizer, chat_examples(tokenizer, pairs, max_length), steps, learning_rate, batch_size, seed,
                        description=f"innocent derivative {seed}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(built_once(target, make))
