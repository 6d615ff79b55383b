"""Weight algebra on the trained weights: freezing, a snapshot of the originals, and averaging
with them (under DeepSpeed through its fp32 master copies)."""
import torch

from oml import distributed


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
    distributed.choose_deepspeed_accelerator()  # before DeepSpeed is imported (here, on use)
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
