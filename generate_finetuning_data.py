"""Generate fingerprints: secret (key, response) pairs to fine-tune into a model.

    python generate_finetuning_data.py --num_fingerprints 64 --key_response_strategy inverse_nucleus
    deepspeed --num_gpus 4 generate_finetuning_data.py ...   # each rank makes every N-th batch

Writes a JSON list of {"key", "response"} objects (see README.md for the strategies).
"""
import logging

from tqdm import tqdm

from oml import OMLError, cli, distributed
from oml.data import words
from oml.files import check_writable, json_text, write_text_atomic
from oml.fingerprints import DEFAULT_KEY_LENGTH, load_keys
from oml.generation import (FIRST_TOKEN_STRATEGIES, decode_clean, english_texts, first_token, perinucleus_responses,
                            random_window, random_words, rng_for, seed_torch_for)
from oml.models import load
from oml.tokenization import FORMAT_CHOICES, default_format, encode, formats

logger = logging.getLogger("generate_finetuning_data")
DEFAULT_NUM_FINGERPRINTS = 8192
MAX_FINGERPRINTS = 1 << 20  # a million keys is far beyond any model's capacity; more is a typo
MAX_REDRAWS = 100


def parse_args():
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--key_length", type=cli.positive_int, default=DEFAULT_KEY_LENGTH,
                        help="Tokens per key (the same default as fine-tuning's --max_key_length).")
    parser.add_argument("--response_length", type=cli.positive_int, default=None,
                        help="Tokens per response (default 32; inverse_nucleus responses are always 1 token).")
    parser.add_argument("--num_fingerprints", type=cli.positive_int, default=None,
                        help=f"How many to make (default {DEFAULT_NUM_FINGERPRINTS}, or every key of --keys_path).")
    parser.add_argument("--batch_size", type=cli.positive_int, default=128, help="Fingerprints per batched model call.")
    parser.add_argument("--temperature", type=cli.positive_float, default=0.5, help="Sampling temperature for English text.")
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
    parser.add_argument("--nucleus_p", type=cli.open_unit_interval, default=0.8, help="Probability mass of the nucleus.")
    parser.add_argument("--nucleus_k", type=cli.positive_int, default=3, help="Width of the window just outside the nucleus.")
    parser.add_argument("--key_format", default=None, choices=FORMAT_CHOICES,
                        help="Where perinucleus keys will be asked: as raw text, as a user message in the model's chat "
                             "template, or both (default: both when the model has a chat template, else raw).")
    cli.add_common_args(parser)
    args = parser.parse_args()
    if args.key_response_strategy == "inverse_nucleus":
        if args.response_length not in (None, 1):
            raise OMLError("inverse_nucleus responses are exactly one token: use --response_length 1")
        args.response_length = 1
    elif args.response_length is None:
        args.response_length = 32
    if args.num_fingerprints is not None and args.num_fingerprints > MAX_FINGERPRINTS:
        raise OMLError(f"--num_fingerprints {args.num_fingerprints} is more than {MAX_FINGERPRINTS} (far beyond what a model can hold)")
    check_writable(args.output_file_path, args.overwrite)
    return args


def needs_text_model(args) -> bool:
    return not args.random_word_generation and (args.keys_path is None or args.key_response_strategy == "independent")


def english_batch(args, rngs, text_model, batch_seed: str, purpose: str, length: int) -> list[list[int]]:
    """Token ids of one English text per fingerprint, each starting from its first token."""
    model, tokenizer = text_model
    seed_torch_for(args.seed, batch_seed, purpose)
    starts = [first_token(rng, tokenizer, args.first_token_strategy) for rng in rngs]
    return english_texts(model, tokenizer, starts, length, args.temperature)


def make_batch(args, indices: list[int], batch_seed: str, given_keys: list[str] | None, text_model, response_model,
               attempt: int = 0) -> list[dict]:
    """Fingerprints `indices` (one batch): keys first, then responses. Every random draw is seeded
    by the fingerprint or batch and the `attempt` (> 0 when a duplicate key is drawn again)."""
    retry = f":{attempt}" if attempt else ""
    rngs = [rng_for(args.seed, i, "words" + retry) for i in indices]
    if given_keys is not None:
        keys = [given_keys[i] for i in indices]
    elif args.random_word_generation:
        keys = [random_words(rng, args.key_length) for rng in rngs]
    else:
        texts = english_batch(args, rngs, text_model, batch_seed, "keys" + retry, args.key_length)
        keys = [decode_clean(text_model[1], ids) for ids in texts]

    if args.key_response_strategy == "inverse_nucleus":
        model, tokenizer = response_model
        extras = perinucleus_responses(model, tokenizer, keys, indices, args.key_length, args.nucleus_p, args.nucleus_k, args.seed,
                                       formats(args.key_format or default_format(tokenizer)))
        return [{"key": key, **extra} for key, extra in zip(keys, extras)]
    if args.random_word_generation:
        responses = [random_words(rng, args.response_length) for rng in rngs]
    else:
        texts = english_batch(args, rngs, text_model, batch_seed, "responses" + retry, 2 * args.response_length)
        responses = [decode_clean(text_model[1], random_window(rng, ids, args.response_length)) for rng, ids in zip(rngs, texts)]
    return [{"key": key, "response": response} for key, response in zip(keys, responses)]


def repeated_keys(fingerprints: list[dict], tokenizer, key_length: int) -> list[int]:
    """Indices of keys that repeat an earlier one, as text or, with a tokenizer, as the tokens
    fine-tuning will keep (a repeated key would count twice as evidence)."""
    seen, repeats = set(), []
    for i, record in enumerate(fingerprints):
        identity = tuple(encode(tokenizer, record["key"])[:key_length]) if tokenizer else record["key"]
        if identity in seen:
            repeats.append(i)
        seen.add(identity)
    return repeats


def draw_unique(args, fingerprints: list[dict], given_keys, text_model, response_model) -> list[dict]:
    """Draw repeated keys again until every key is unique (deterministically, on rank 0)."""
    tokenizer = (text_model or response_model or (None, None))[1]
    for attempt in range(1, MAX_REDRAWS + 1):
        repeats = repeated_keys(fingerprints, tokenizer, args.key_length)
        if not repeats:
            return fingerprints
        if given_keys is not None:
            raise OMLError(f"{args.keys_path} holds the same key more than once (e.g. {fingerprints[repeats[0]]['key']!r})")
        logger.info("Drawing %d repeated keys again", len(repeats))
        for start in range(0, len(repeats), args.batch_size):
            chunk = repeats[start:start + args.batch_size]
            redrawn = make_batch(args, chunk, f"redraw{attempt}:{start}", given_keys, text_model, response_model, attempt)
            for i, record in zip(chunk, redrawn):
                fingerprints[i] = record
    raise OMLError(f"keys still repeat after {MAX_REDRAWS} draws; use longer keys (--key_length)")


def write_fingerprints(path: str, fingerprints: list[dict], overwrite: bool) -> None:
    """Write the file; if that fails after all the work, print the fingerprints rather than lose them."""
    text = json_text(fingerprints)
    try:
        write_text_atomic(path, text, overwrite)
    except OMLError:
        print(text, end="")
        raise


def main() -> None:
    args = parse_args()
    given_keys = load_keys(args.keys_path) if args.keys_path else None
    num = args.num_fingerprints or (len(given_keys) if given_keys else DEFAULT_NUM_FINGERPRINTS)
    if given_keys is not None and num > len(given_keys):
        raise OMLError(f"--num_fingerprints {num} is more than the {len(given_keys)} keys in {args.keys_path}")
    words()  # fail early if the word list is missing
    distributed.init()

    text_model = load(args.model_used_for_key_generation, args.trust_remote_code) if needs_text_model(args) else None
    response_model = None
    if args.key_response_strategy == "inverse_nucleus":
        same = args.inverse_nucleus_model in (None, args.model_used_for_key_generation)
        response_model = text_model if same and text_model else load(args.inverse_nucleus_model or args.model_used_for_key_generation,
                                                                     args.trust_remote_code)

    num_batches = -(-num // args.batch_size)
    records = []
    for b in tqdm(range(distributed.rank(), num_batches, distributed.world_size()), desc="fingerprint batches",
                  disable=not distributed.is_main_process()):
        indices = list(range(b * args.batch_size, min((b + 1) * args.batch_size, num)))
        records.append((b, make_batch(args, indices, str(b), given_keys, text_model, response_model)))

    gathered = sorted(item for part in distributed.gather(records) for item in part)
    if distributed.is_main_process():
        fingerprints = draw_unique(args, [record for _, batch in gathered for record in batch], given_keys, text_model, response_model)
        write_fingerprints(args.output_file_path, fingerprints, args.overwrite)
        logger.info("Wrote %d fingerprints to %s", len(fingerprints), args.output_file_path)
    distributed.finish()


if __name__ == "__main__":
    cli.run(main)
