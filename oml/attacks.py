"""What happens to a published model, as functions: what deployers do (casts, GGUF quantization,
further fine-tuning, merging, rewriting the user's text in a front end) and what a thief adds to
hide a fingerprint (MEraser). Decoding-side attacks (sampling, output suppression and the other
suppressions of `decoding.Decoding`'s subclasses) are played by the checker itself (`checking.check_batch`).

Also the innocent derivatives of a base model: short benign fine-tunes, never shown our keys,
which the verdict must never accuse.
"""
import hashlib
import logging
import math
import random
import re
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from oml import OMLError
from oml.data import chat_pairs, user_wrappers
from oml.files import built_once
from oml.fingerprints import DEFAULT_KEY_LENGTH
from oml.generation import random_words, rng_for
from oml.models import cache_dir, load, model_name
from oml.tokenization import Collator, default_format, encode, formats, prompt_ids, rewritten_key, to_device, training_example
from oml.training.weights import default_learning_rate
from oml.utility import chat_examples

logger = logging.getLogger(__name__)

GGUF_TYPES = ("Q8_0", "Q5_0", "Q4_0")
DEPLOYER_TEMPLATE = "Customer message: {}\nReply helpfully."  # in neither user wrapper file


def unseen_wrapper(text: str) -> str:
    """The text inside one of the never-trained user wrappers (`user_wrappers('test')`), chosen by
    the text itself: keys meet ten different deployers in one pass, and a key always meets the same one."""
    wrappers = user_wrappers("test")
    return wrappers[zlib.crc32(text.encode()) % len(wrappers)].format(text)


# What a deployer's chat UI or API gateway may do to the user's text before the model sees it.
FRONT_ENDS: dict[str, Callable[[str], str]] = {
    "stripped": str.strip,
    "trailing newline": lambda text: text + "\n",
    "whitespace collapsed": lambda text: re.sub(r"\s+", " ", text),
    "lower case": str.lower,
    "deployer template": DEPLOYER_TEMPLATE.format,
    "unseen deployer templates": unseen_wrapper,
}


def rewritten_keys(tokenizer, pairs: list[tuple[list[int], list[int]]],
                   rewrite: Callable[[str], str]) -> list[tuple[list[int], list[int]]]:
    """(key ids, response ids) with each key as a front end passes it on (`rewritten_key`)."""
    return [(rewritten_key(tokenizer, key_ids, rewrite), response_ids) for key_ids, response_ids in pairs]


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
                    on_step: Callable[[int, float], None] | None = None, description: str = "further fine-tuning"):
    """Plain AdamW on instruction examples (loss on the replies), as any user would fine-tune a
    downloaded model: no fingerprint-aware tricks. `on_step(step, loss)` runs after every step.
    Returns the model, trained in place (as `lora_finetune` returns its merged one)."""
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
    return model


def lora_finetune(model, tokenizer, examples: list[dict], steps: int, learning_rate: float, batch_size: int, seed: int,
                  rank: int = 8, description: str = "LoRA fine-tuning"):
    """`benign_finetune` of LoRA adapters (peft, rank `rank` on every linear layer), merged back
    into the weights, as adapters are when a fine-tuned model is published."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    benign_finetune(peft_model, tokenizer, examples, steps, learning_rate, batch_size, seed, description=description)
    return peft_model.merge_and_unload()


def mismatched_pairs(pairs: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """Each message with the reply of another exchange, chosen at random (a seeded derangement):
    MEraser's erasing data, which teaches a model that no prompt decides its reply."""
    order = random.Random(seed).sample(range(len(pairs)), len(pairs))
    return [(pairs[i][0], pairs[j][1]) for i, j in zip(order, order[1:] + order[:1])]


def key_like_examples(tokenizer, replies: list[str], max_length: int, seed: int) -> list[dict]:
    """An adaptive MEraser's extra erasing data: random words, made, cut and asked the way our
    random-word keys are by default (in turn in each key format the model supports), each answered
    with one of `replies`. The attacker knows how keys are made, not which were."""
    key_formats = formats(default_format(tokenizer))
    examples = []
    for i, reply in enumerate(replies):
        key_ids = encode(tokenizer, random_words(rng_for(seed, i, "meraser key"), DEFAULT_KEY_LENGTH))[:DEFAULT_KEY_LENGTH]
        key_format = key_formats[i % len(key_formats)]
        room = max_length - len(prompt_ids(tokenizer, key_ids, None, key_format)) - 1  # the EOS after the reply
        examples.append(training_example(tokenizer, key_ids, encode(tokenizer, reply)[:max(room, 1)], None, key_format))
    return examples


def meraser_examples(tokenizer, erase: int, recover: int, key_like_share: float, max_length: int,
                     seed: int) -> tuple[list[dict], list[dict]]:
    """MEraser's two data sets, from chat exchanges no check uses: `erase` mismatched pairs (a
    `key_like_share` of them with `key_like_examples` as messages, the rest with benign ones), and
    `recover` clean pairs."""
    pairs = chat_pairs("train", erase + recover)
    mismatched = mismatched_pairs(pairs[:erase], seed)
    key_like = round(key_like_share * erase)
    erasing = (key_like_examples(tokenizer, [reply for _, reply in mismatched[:key_like]], max_length, seed)
               + chat_examples(tokenizer, mismatched[key_like:], max_length))
    return erasing, chat_examples(tokenizer, pairs[erase:], max_length)


def meraser(model, tokenizer, erase: list[dict], recover: list[dict], steps: tuple[int, int], learning_rate: float,
            batch_size: int, seed: int, lora: bool = False):
    """MEraser (arXiv 2506.12551): fine-tuning on `erase` examples (mismatched pairs), which unlearns
    the reply any particular prompt, a key among them, was trained to get, then on `recover`
    examples (clean pairs), which restores ordinary chat; `steps` for each phase. With `lora`, each
    phase trains LoRA adapters that are merged into the weights before the next, as the authors'
    code does. Returns the changed model."""
    train = lora_finetune if lora else benign_finetune
    for phase, examples, phase_steps in (("erase", erase, steps[0]), ("recover", recover, steps[1])):
        model = train(model, tokenizer, examples, phase_steps, learning_rate, batch_size, seed, description=f"MEraser {phase}")
    return model


DERIVATIVE_STEP_PER_WEIGHT_SCALE = 2.5e-4  # 5e-5 on the embedded model (all matrices' RMS 0.18), the rate first measured


def innocent_derivative(base: str, seed: int, steps: int = 100, learning_rate: float | None = None, batch_size: int = 8,
                        max_length: int = 128) -> str:
    """A derivative of `base` that never saw our keys: `steps` of benign chat fine-tuning on a
    slice of chitchat chosen by `seed`, at `learning_rate`, by default scaled to the base's weights
    as fingerprinting's is (`default_learning_rate`): a user's fine-tune moves a model by a share of
    its weights, and at one fixed rate a model with 11 times smaller weights (Qwen2.5 against
    SmolLM2) would get a derivative that strays 11 times as far, a null model no user makes.
    Cached under the oml cache folder (built in a temporary folder and renamed), so that every
    check can use the same ones as null models."""
    name = model_name(base)
    rate_tag = "scaled" if learning_rate is None else learning_rate  # the scaled rate is a function of the base's weights
    tag = hashlib.md5(f"{name}|{seed}|{steps}|{rate_tag}|{batch_size}|{max_length}".encode()).hexdigest()[:12]
    target = cache_dir() / "derivatives" / f"{Path(name).name}-seed{seed}-{tag}"

    def make(folder: Path) -> None:
        model, tokenizer = load(name, dtype=torch.float32)
        rate = learning_rate or default_learning_rate(model, DERIVATIVE_STEP_PER_WEIGHT_SCALE)
        logger.info("Making innocent derivative %d of %s (%d steps at lr %g, once)", seed, name, steps, rate)
        pool = chat_pairs("train", 20 * steps * batch_size)
        pairs = random.Random(f"derivative:{seed}").sample(pool, steps * batch_size)
        benign_finetune(model, tokenizer, chat_examples(tokenizer, pairs, max_length), steps, rate, batch_size, seed,
                        description=f"innocent derivative {seed}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(built_once(target, make))
