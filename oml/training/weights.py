"""Weight algebra on the trained weights: freezing, a snapshot of the originals, and averaging
with them (under DeepSpeed through its fp32 master copies)."""
import math

import torch

from oml import OMLError, distributed


def freeze(model, train_embeddings: bool = False, frozen_layer_fraction: float = 0.0) -> None:
    """Freeze what fine-tuning leaves as it is: the token embeddings unless `train_embeddings`, and
    the lowest `frozen_layer_fraction` of the transformer layers (`frozen_layers`)."""
    if not train_embeddings:
        freeze_embeddings(model)
    count = frozen_layers(model.config, frozen_layer_fraction)
    if count:  # a model without a findable layer stack still trains with nothing frozen
        for layer in transformer_layers(model)[:count]:
            layer.requires_grad_(False)


STEP_PER_WEIGHT_SCALE = 5e-4  # the embedded model's tuned 1e-4 over the RMS of its trained weight matrices (0.19)


def default_learning_rate(model, step_per_weight_scale: float = STEP_PER_WEIGHT_SCALE) -> float:
    """`step_per_weight_scale` times the RMS of the weight matrices left trainable, to one significant
    digit. Adam moves every weight by about the learning rate a step whatever its size, so one rate
    changes models with smaller weights far more: Qwen2.5's matrices have an RMS of 0.017, 11 times
    SmolLM2's, and at SmolLM2's 1e-4 it drifted to a KL of 0.48 from its base. Scaled, every model
    moves by the same fraction of its weights: 1e-4 for SmolLM2-135M, 9e-6 for Qwen2.5-Coder-0.5B,
    and 1e-5, the original scripts' default for 7B models, for weights of RMS 0.02. Rounded so that
    copies of one model that differ by quantization noise train alike."""
    matrices = [p.detach() for p in model.parameters() if p.requires_grad and p.ndim == 2]
    if not matrices:
        raise OMLError("no weight matrix is left to train; lower --frozen_layer_fraction")
    squares = sum(p.double().pow(2).sum().item() for p in matrices) / sum(p.numel() for p in matrices)
    return float(f"{step_per_weight_scale * math.sqrt(squares):.0e}")


def frozen_layers(config, fraction: float) -> int:
    """How many of the model's transformer layers `fraction` freezes: rounded down to whole layers
    (with a margin for float error: 0.29 of 100 layers is 29)."""
    return math.floor(fraction * config.get_text_config().num_hidden_layers + 1e-9)


def freeze_embeddings(model) -> None:
    """Freeze the input and output token embeddings (one matrix when they are tied)."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.weight.requires_grad_(False)


def transformer_layers(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks, lowest first: the one ModuleList as long as its config's
    num_hidden_layers (`model.layers` in Llama, Qwen2, Gemma and Mistral, `gpt_neox.layers`,
    `transformer.h`; a vision tower or a list of experts has another length)."""
    count = model.config.get_text_config().num_hidden_layers
    stacks = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList) and len(module) == count]
    if len(stacks) != 1:
        raise OMLError(f"{type(model).__name__}: found {len(stacks)} lists of {count} layers, not one, so no layers can be "
                       "frozen; use --frozen_layer_fraction 0")
    return stacks[0]


def snapshot_weights(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trainable weights before fine-tuning, in `dtype`, for weight averaging and shrinking:
    a CPU copy on each node's local rank 0, and on the node's other ranks only each weight's
    shape and dtype (a meta tensor), the values coming from local rank 0 when they are used
    (`average_with_original`).

    One copy per node rather than per rank: a 7B model has about 7.0e9 parameters outside its
    embeddings (Llama-3-8B and Mistral-7B alike), 3.5e9 trained with the default
    --frozen_layer_fraction 0.5, 7 GB in bf16 (14 GB with every layer trained), so a copy on each
    of 8 ranks would take 56 GB of the node's host memory. Keeping each rank's ZeRO-3 shard would
    also total 7 GB a node; one copy per node works the same at every ZeRO stage, for a broadcast
    of those 7 GB within the node each time the weights are averaged or rescaled."""
    keep = distributed.local_rank() == 0
    return {name: param.detach().to("cpu", dtype, copy=True) if keep else torch.empty(param.shape, dtype=dtype, device="meta")
            for name, param in model.named_parameters() if param.requires_grad}


@torch.no_grad()
def average_with_original(model, original: dict[str, torch.Tensor], strength: float) -> None:
    """weights <- (1 - strength) * weights + strength * original, on every rank (`original` as
    `snapshot_weights` made it: each weight is sent from the node's local rank 0 as it is used).

    Under DeepSpeed the optimizer steps its own fp32 master copy of each weight and
    overwrites the module's copy after every step, so the average is computed from and
    written to that master copy (ZeRO 1-3), and then to the module's copy.
    """
    distributed.choose_deepspeed_accelerator()  # before DeepSpeed is imported (here, on use)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for name, param in model.named_parameters():
        if name not in original:  # frozen
            continue
        master = safe_get_full_fp32_param(param)
        current = master if master is not None else param.data
        original_weight = distributed.from_node_leader(original[name]).to(current.device, torch.float32)
        averaged = current.float().lerp(original_weight, strength)
        if master is not None:
            safe_set_full_fp32_param(param, averaged)
        if hasattr(param, "ds_id"):  # ZeRO-3: the module weight is partitioned across ranks
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(averaged.to(param.dtype))
        else:
            param.data.copy_(averaged.to(param.dtype))
