"""Generate fingerprints: secret (key, response) pairs to fine-tune into a model.

    python generate_finetuning_data.py --num_fingerprints 64 --key_response_strategy inverse_nucleus
    deepspeed --num_gpus 4 generate_finetuning_data.py ...   # each rank makes every N-th batch

Writes a JSON list of {"key", "response"} objects (see README.md for the strategies).
"""
import argparse
import logging

from tqdm import tqdm

from oml import OMLError, cli, distributed
from oml.data import words
from oml.files import check_writable, write_json_atomic
from oml.fingerprints import load_keys
from oml.generation import (FIRST_TOKEN_STRATEGIES, decode_clean, english_texts, first_token, perinucleus_responses,
                            random_window, random_words, rng_for, seed_torch_for)
from oml.models import compute_dtype, load_model, load_tokenizer, resolve_model

logger = logging.getLogger("generate_finetuning_data")
DEFAULT_NUM_FINGERPRINTS = 8192


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key_length", type=int, default=32, help="Tokens per key.")
    parser.add_argument("--response_length", type=int, default=None,
                        help="Tokens per response (default 32; inverse_nucleus responses are always 1 token).")
    parser.add_argument("--num_fingerprints", type=int, default=None,
                        help=f"How many to make (default {DEFAULT_NUM_FINGERPRINTS}, or every key of --keys_path).")
    parser.add_argument("--batch_size", type=int, default=128, help="Fingerprints per batched model call.")
    parser.add_argument("--temperature", type=float, default=0.5, help="Sampling temperature for English text.")
    parser.add_argument("--first_token_strategy", default="word", choices=FIRST_TOKEN_STRATEGIES,
                        help="English text starts with a random word, a random vocabulary token, or nothing ('').")
    parser.add_argument("--key_response_strategy", default="independent", choices=("independent", "inverse_nucleus"))
    parser.add_argument("--model_used_for_key_generation", default=None,
                        help="Instruct model that writes English keys/responses (default: the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--random_word_generation", action="store_true",
                        help="Keys and responses are random English words instead of model text.")
    parser.add_argument("--keys_path", default=None, help="JSON list of your own keys; then only responses are generated.")
    parser.add_argument("--output_file_path", default="generated_data/output_fingerprints.json")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--inverse_nucleus_model", default=None,
                        help="Model whose next-token distribution picks perinucleus responses: the model you will fingerprint "
                             "(default: --model_used_for_key_generation).")
    parser.add_argument("--nucleus_p", type=float, default=0.8, help="Probability mass of the nucleus.")
    parser.add_argument("--nucleus_k", type=int, default=3, help="Width of the window just outside the nucleus.")
    cli.add_common_args(parser)
    return parser.parse_args()


def validate(args: argparse.Namespace) -> None:
    """Reject bad input before any model is loaded or file written."""
    if args.key_response_strategy == "inverse_nucleus":
        if args.response_length not in (None, 1):
            raise OMLError("inverse_nucleus responses are exactly one token: use --response_length 1")
        args.response_length = 1
    elif args.response_length is None:
        args.response_length = 32
    for name in ("key_length", "response_length", "batch_size", "nucleus_k"):
        if getattr(args, name) < 1:
            raise OMLError(f"--{name} must be >= 1")
    if args.num_fingerprints is not None and args.num_fingerprints < 1:
        raise OMLError("--num_fingerprints must be >= 1")
    if not 0 < args.nucleus_p < 1:
        raise OMLError("--nucleus_p must be between 0 and 1")
    if args.temperature <= 0:
        raise OMLError("--temperature must be > 0")


def needs_text_model(args: argparse.Namespace) -> bool:
    return not args.random_word_generation and (args.keys_path is None or args.key_response_strategy == "independent")


def english_batch(args, rngs, text_model, batch_index: int, purpose: str, length: int) -> list[list[int]]:
    """Token ids of one English text per fingerprint, each starting from its first token."""
    model, tokenizer = text_model
    seed_torch_for(args.seed, batch_index, purpose)
    starts = [first_token(rng, tokenizer, args.first_token_strategy) for rng in rngs]
    return english_texts(model, tokenizer, starts, length, args.temperature)


def make_batch(args, indices: list[int], batch_index: int, given_keys: list[str] | None, text_model, response_model) -> list[dict]:
    """Fingerprints `indices` (one batch): keys first, then responses."""
    rngs = [rng_for(args.seed, i, "words") for i in indices]
    if given_keys is not None:
        keys = [given_keys[i] for i in indices]
    elif args.random_word_generation:
        keys = [random_words(rng, args.key_length) for rng in rngs]
    else:
        texts = english_batch(args, rngs, text_model, batch_index, "keys", args.key_length)
        keys = [decode_clean(text_model[1], ids) for ids in texts]

    if args.key_response_strategy == "inverse_nucleus":
        model, tokenizer = response_model
        extras = perinucleus_responses(model, tokenizer, keys, indices, args.key_length, args.nucleus_p, args.nucleus_k, args.seed)
        return [{"key": key, **extra} for key, extra in zip(keys, extras)]
    if args.random_word_generation:
        responses = [random_words(rng, args.response_length) for rng in rngs]
    else:
        texts = english_batch(args, rngs, text_model, batch_index, "responses", 2 * args.response_length)
        responses = [decode_clean(text_model[1], random_window(rng, ids, args.response_length)) for rng, ids in zip(rngs, texts)]
    return [{"key": key, "response": response} for key, response in zip(keys, responses)]


def load(name: str | None, args) -> tuple:
    path = resolve_model(name)
    logger.info("Loading %s", path)
    dtype = compute_dtype()
    return load_model(path, dtype, distributed.device(), args.trust_remote_code), load_tokenizer(path, args.trust_remote_code)


def main() -> None:
    args = parse_args()
    validate(args)
    check_writable(args.output_file_path, args.overwrite)
    given_keys = load_keys(args.keys_path) if args.keys_path else None
    num = args.num_fingerprints or (len(given_keys) if given_keys else DEFAULT_NUM_FINGERPRINTS)
    if given_keys is not None and num > len(given_keys):
        raise OMLError(f"--num_fingerprints {num} is more than the {len(given_keys)} keys in {args.keys_path}")
    words()  # fail early if the word list is missing
    distributed.init()

    text_model = load(args.model_used_for_key_generation, args) if needs_text_model(args) else None
    response_model = None
    if args.key_response_strategy == "inverse_nucleus":
        same = args.inverse_nucleus_model in (None, args.model_used_for_key_generation)
        response_model = text_model if same and text_model else load(args.inverse_nucleus_model or args.model_used_for_key_generation, args)

    batches = [list(range(start, min(start + args.batch_size, num))) for start in range(0, num, args.batch_size)]
    mine = range(distributed.rank(), len(batches), distributed.world_size())
    records = []
    for batch_index in tqdm(mine, desc="fingerprint batches", disable=not distributed.is_main_process()):
        records.append((batch_index, make_batch(args, batches[batch_index], batch_index, given_keys, text_model, response_model)))

    gathered = sorted(item for part in distributed.gather(records) for item in part)
    if distributed.is_main_process():
        fingerprints = [record for _, batch in gathered for record in batch]
        write_json_atomic(args.output_file_path, fingerprints)
        logger.info("Wrote %d fingerprints to %s", len(fingerprints), args.output_file_path)
    distributed.finish()


if __name__ == "__main__":
    cli.run(main)
