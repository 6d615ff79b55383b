"""The reply measure of several models against one base, the base's replies generated once.

    python benchmarks/replies_side_by_side.py --base_model BASE --models NAME=MODEL_DIR [NAME=MODEL_DIR ...] \
        [--exclude_keys RUN/fingerprints.json ...] [--num_reply_prompts 240 ...] [--smoke]

What evaluate_utility.py reports as "replies" (see oml/replies.py), for candidates fine-tuned
from the same base: the base's greedy and sampled replies are the same for all of them, so
they are made once instead of once per model.
"""
from common import benchmark_parser, save, tiny_model

from oml import cli
from oml.models import load
from oml.files import read_json
from oml.replies import ReplyMeasure, ReplySettings, fingerprint_keys


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--base_model", default=None, help="The base (default: the embedded model).")
    parser.add_argument("--models", nargs="+", default=[], help="NAME=MODEL_DIR pairs.")
    parser.add_argument("--exclude_keys", nargs="*", default=[], help="Fingerprint files whose keys are never asked.")
    parser.add_argument("--name", default="replies_side_by_side", help="Name of the result file.")
    cli.add_settings(parser, ReplySettings)
    args = parser.parse_args()
    settings = cli.settings_from(ReplySettings, args)
    if any("=" not in pair for pair in args.models):
        parser.error("--models takes NAME=MODEL_DIR pairs")
    models = dict(pair.split("=", 1) for pair in args.models)
    if args.smoke:
        args.base_model, models = tiny_model(), {"itself": tiny_model()}
        settings = settings.updated(num_reply_prompts=6, max_reply_tokens=4)
    keys = set().union(*(fingerprint_keys(read_json(path, "fingerprint file")) for path in args.exclude_keys))
    base, tokenizer = load(args.base_model)
    measure = ReplyMeasure(base, tokenizer, settings, keys)
    result = {"base_model": args.base_model, "settings": settings.to_dict(), "excluded_keys": len(keys),
              "models": {name: measure.compare(load(path)[0], name) for name, path in models.items()}}
    save(args.results_dir, args.name, result)


if __name__ == "__main__":
    main()
