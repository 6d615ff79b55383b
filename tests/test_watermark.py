"""The domain watermark (oml.watermark): green lists, the tilted teacher, scoring, the sequential
check and the domain prompts. Tiny random models with the real SmolLM2 tokenizer; no training."""
import json
import math
import random

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from scipy.stats import kstest

from oml import OMLError
from oml.data import user_questions
from oml.models import load_model
from oml.replies import ReplySettings, replies as replies_of, stop_ids
from oml.sequential import MATCH, NO_MATCH
from oml.tokenization import IGNORE_INDEX, encode, user_turn_ids
from oml.watermark import (MIN_DOMAIN_PROMPTS, BadSignature, PublicKey, RevealedSeeds, Selection, WatermarkCheckConfig,
                           WatermarkKey, WatermarkLogitsProcessor, WatermarkParams, WatermarkSequentialTest, context_class,
                           context_seed, domain_prompts, green, green_masks, next_selection, score, sequential_outcomes,
                           special_ids, tilt, watermarked_replay, watermarked_replies)
from tests.conftest import make_tiny_model

V = 49152  # the SmolLM2 vocabulary
GAMMA = 0.25


_KEYS: dict[int, str] = {}


def key_of(seed: int, **params) -> WatermarkKey:
    """The test's key number `seed` (one fresh 2048-bit RSA key per number and session: the
    smallest size WatermarkKey accepts, quick to make; real keys have 3072 bits)."""
    if seed not in _KEYS:
        _KEYS[seed] = WatermarkKey.generate(bits=2048).private_pem
    return WatermarkKey(_KEYS[seed], WatermarkParams(**params))


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    return load_model(str(make_tiny_model(tokenizer, tmp_path_factory.mktemp("watermark") / "base", seed=5)))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Checking prompts of the shipped domain, asked through the chat template as a checker asks them."""
    return [user_turn_ids(tokenizer, text) for text in domain_prompts("cooking", "test")[:32]]


def green_chain(key: WatermarkKey, length: int, seed: int = 0) -> list[int]:
    """A text of `length` tokens (after token 100), each green after the one before: the strongest watermark."""
    rng, chain = random.Random(seed), [100]
    for _ in range(length):
        chain.append(rng.choice(np.flatnonzero(green_masks(key, [(chain[-1],)], V)[0].numpy()).tolist()))
    return chain[1:]


def test_green_lists_hold_a_gamma_share_are_deterministic_and_independent_across_keys():
    a, b = key_of(1), key_of(2)
    contexts = [(t,) for t in range(0, V, 997)]
    masks_a, masks_b = green_masks(a, contexts, V).numpy(), green_masks(b, contexts, V).numpy()
    assert abs(masks_a.mean() - GAMMA) < 0.002 and abs(masks_b.mean() - GAMMA) < 0.002
    assert abs(masks_a[0].mean() - GAMMA) < 0.01  # each context's own list, not only on average
    assert np.array_equal(masks_a, green_masks(WatermarkKey(a.private_pem), contexts, V).numpy())  # the secret decides
    assert abs((masks_a & masks_b).mean() - GAMMA ** 2) < 0.002  # another key's lists are unrelated to ours
    assert abs((masks_a[0] & masks_a[1]).mean() - GAMMA ** 2) < 0.005  # and so are two contexts' lists
    assert abs(green_masks(key_of(1, gamma=0.5), contexts, V).numpy().mean() - 0.5) < 0.002
    seeds = np.array([context_seed(a, c) for c in contexts[:3]], dtype=np.uint64)
    one_by_one = [green(s, np.arange(V), GAMMA) for s in seeds]
    assert np.array_equal(np.stack(one_by_one), green(seeds[:, None], np.arange(V)[None, :], GAMMA))


def test_special_tokens_are_never_green_and_keep_their_probability(tokenizer):
    key, special = key_of(3), special_ids(tokenizer)
    masks = green_masks(key, [(t,) for t in range(200)], V, special)
    assert not masks[:, sorted(special)].any()
    logits = torch.randn(6, V)
    tilted = tilt(logits, [(t,) for t in range(6)], key, special)
    before, after = torch.softmax(logits, -1), torch.softmax(tilted, -1)
    torch.testing.assert_close(after[:, sorted(special)], before[:, sorted(special)])
    green_mass = lambda p: (p * green_masks(key, [(t,) for t in range(6)], V, special)).sum(-1)  # noqa: E731
    assert (green_mass(after) > 0.9).all() and (green_mass(before) < 0.3).all()  # delta 4 on a flat distribution


def test_the_logits_processor_tilts_after_each_rows_last_tokens():
    key = key_of(4, context_width=2)
    ids, scores = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.randn(2, V)
    expected = scores + 4.0 * green_masks(key, [(6, 7), (9, 10)], V)
    torch.testing.assert_close(WatermarkLogitsProcessor(key)(ids, scores.clone()), expected)


@pytest.mark.slow
def test_null_p_values_are_uniform_over_random_keys(tokenizer):
    """Real text scored under 200 keys it was not written with: the p-values are uniform."""
    replies = [encode(tokenizer, text) for text in user_questions("test")[:60]]
    p_values = [10 ** score(replies, None, key_of(1000 + i)).log10_p for i in range(200)]
    assert score(replies, None, key_of(0)).pairs > 500
    assert kstest(p_values, "uniform").pvalue > 0.01
    assert np.mean(np.array(p_values) < 0.05) < 0.1


def test_the_sequential_check_falsely_matches_at_most_alpha_in_simulation():
    alpha = 1e-2  # large enough to see false MATCHes in 20,000 simulated checks
    decisions, asked = sequential_outcomes(GAMMA, pairs_per_reply=40, trials=20_000, alpha=alpha)
    assert np.mean(decisions == 1) <= alpha
    assert np.median(asked) < WatermarkCheckConfig().max_replies  # an innocent model is mostly cleared before the cap
    below = sequential_outcomes(0.2, pairs_per_reply=40, trials=2_000, alpha=alpha)[0]  # an innocent model below gamma
    assert np.mean(below == 1) <= alpha


def test_a_watermark_weaker_than_any_guess_is_still_found():
    """The mixture over rates finds a green rate of 0.3 (an SPRT against, say, 0.5 would clear it)
    given replies enough, and a rate of 0.45 within 64 replies of 40 unique pairs each."""
    decisions, _ = sequential_outcomes(0.3, pairs_per_reply=40, trials=500, config=WatermarkCheckConfig(max_replies=1024))
    assert np.mean(decisions == 1) > 0.95
    decisions, asked = sequential_outcomes(0.45, pairs_per_reply=40, trials=500)
    assert np.all(decisions == 1) and asked.max() <= 64


def test_text_watermarked_under_one_key_matches_it_and_no_other(tiny, tokenizer, prompts):
    key, other, special = key_of(5), key_of(6), special_ids(tokenizer)
    replies = watermarked_replies(tiny, tokenizer, prompts[:8], key, 24, temperature=1.0)
    ours = WatermarkSequentialTest(key, special)
    ours.add(replies, prompts[:8])
    assert ours.decision() == MATCH and ours.summary()["log10_p_value"] <= -6
    assert ours.score.z > 10 and ours.score.green / ours.score.pairs > 0.8
    theirs = WatermarkSequentialTest(other, special, config=WatermarkCheckConfig(max_replies=8))  # the same text, another key
    theirs.add(replies, prompts[:8])
    assert theirs.decision() == NO_MATCH and abs(theirs.score.z) < 4
    base = WatermarkSequentialTest(key, special, config=WatermarkCheckConfig(replies_per_round=8, max_replies=16))
    while base.next_round():  # the base's own text, asked round by round as a check asks it
        asked = prompts[len(base.replies):len(base.replies) + base.next_round()]
        base.add(replies_of(tiny, tokenizer, asked, ReplySettings(max_reply_tokens=24), 1.0, stop_ids(tiny, tokenizer), "base"),
                 asked)
    assert base.decision() == NO_MATCH and len(base.replies) == 16 and abs(base.score.z) < 4


def test_repeated_text_counts_once_and_empty_or_short_replies_never_count(tokenizer):
    key, eos = key_of(8), tokenizer.eos_token_id
    reply = green_chain(key, 40)
    once = score([reply], None, key, special_ids(tokenizer))
    assert once.counted == 1 and once.pairs == 39 and once.green == 39  # the first token has no known context
    again = score([reply, reply + [eos], reply * 5, [eos], [], reply[:2]], None, key, special_ids(tokenizer))
    assert (again.replies, again.counted, again.identical, again.empty, again.short) == (6, 2, 1, 2, 1)
    assert again.pairs == 40 and again.green >= 39  # the loop adds one pair (of any colour): where the reply starts over
    assert again.looping == 1
    with_context = score([reply], [[100]], key)
    assert with_context.pairs == 40 and with_context.green == 40


def test_a_strong_watermark_reports_z_and_p_without_underflow():
    key = key_of(9)
    strong = score([green_chain(key, 2000)], [[100]], key)
    assert strong.pairs > 1900 and strong.z > 70
    assert -1e4 < strong.log10_p < -1000 and math.isfinite(strong.log10_p_binomial) and strong.log10_p_binomial < -1000
    nothing = score([], None, key)
    assert (nothing.pairs, nothing.z, nothing.log10_p) == (0, 0.0, 0.0)


def test_watermarked_replay_is_distilled_replay_format_with_green_mass_raised(tiny, tokenizer, prompts):
    key, top_k = key_of(10), 64
    examples = watermarked_replay(tiny, tokenizer, prompts[:4], key, reply_tokens=8, top_k=top_k, temperature=1.0)
    special = special_ids(tokenizer)
    for prompt, example in zip(prompts, examples):
        ids, n = example["input_ids"], len(example["input_ids"])
        assert ids[:len(prompt)] == prompt and len(prompt) < n <= len(prompt) + 8
        assert example["labels"] == [IGNORE_INDEX] * n
        assert example["teacher_ids"].shape == (n, top_k) and example["teacher_ids"].dtype == torch.int32
        assert example["teacher_probs"].shape == (n, top_k) and example["teacher_probs"].dtype == torch.float32
        taught = example["teacher_probs"].sum(-1) > 0
        assert taught.tolist() == [len(prompt) - 1 <= t < n - 1 for t in range(n)]  # the rows over reply tokens only
        rows = torch.arange(len(prompt) - 1, n - 1)
        with torch.no_grad():
            logits = tiny(input_ids=torch.tensor([ids])).logits[0, rows].float()
        contexts = [(ids[t],) for t in rows]
        masks = green_masks(key, contexts, V, special)
        base, specials = torch.softmax(logits, -1), sorted(special)
        # The tilt from its definition: special tokens keep the base's probability, the others share
        # the rest in proportion to p * exp(delta) on green tokens, p on the others.
        others = base * torch.exp(4.0 * masks)
        others[:, specials] = 0.0
        expected = others / others.sum(-1, keepdim=True) * (1 - base[:, specials].sum(-1, keepdim=True))
        expected[:, specials] = base[:, specials]
        teacher_ids, teacher_probs = example["teacher_ids"][rows].long(), example["teacher_probs"][rows]
        torch.testing.assert_close(teacher_probs, expected.gather(-1, teacher_ids), rtol=1e-4, atol=1e-6)
        assert torch.equal(teacher_probs, teacher_probs.sort(-1, descending=True).values)  # the tilted top k
        green_share = (teacher_probs * masks.gather(-1, teacher_ids)).sum(-1) / teacher_probs.sum(-1)
        assert (green_share > 0.9).all() and ((base * masks).sum(-1) < 0.3).all()  # green ids gained the mass


def test_malformed_keys_are_one_line_errors():
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    curve = ec.generate_private_key(ec.SECP256R1())
    for pem, problem in (("not a key", "not an unencrypted PEM private key"), (1234, "not an unencrypted PEM private key"),
                         (pem_of(small), "an RSA key of at least 2048 bits"), (pem_of(curve), "an RSA key of at least 2048 bits")):
        with pytest.raises(OMLError, match=problem):
            WatermarkKey(pem)
    with pytest.raises(OMLError, match="secrets.json: a watermark key must be a JSON object with a 'private_key'"):
        WatermarkKey.from_dict({"gamma": 0.25}, "secrets.json")
    with pytest.raises(OMLError, match="secrets.json: gamma 1.5 is not strictly between 0 and 1"):
        WatermarkKey.from_dict({"private_key": key_of(1).private_pem, "gamma": 1.5}, "secrets.json")
    key = WatermarkKey.generate()
    assert WatermarkKey.from_dict(json.loads(json.dumps(key.to_dict())), "secrets.json") == key
    assert key.__dict__["_private"].key_size == 3072 and "PRIVATE" not in repr(key)
    with pytest.raises(OMLError, match="not a PEM public key"):
        PublicKey.from_pem(key.private_pem, "commitment.json")


def pem_of(private) -> str:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode("ascii")


def test_revealed_signatures_give_those_green_lists_and_no_others():
    """A verifier's RevealedSeeds: the owner's seeds for the contexts revealed, checked with the
    public key alone; a forged signature or one for another context is refused; other contexts
    stay unknown."""
    key, other = key_of(11), key_of(12)
    public = PublicKey.from_pem(key.public.pem, "commitment.json")
    revealed = RevealedSeeds(public, key.params, {(7,): key.sign((7,)), (8,): key.sign((8,))})
    assert [context_seed(revealed, (t,)) for t in (7, 8)] == [context_seed(key, (t,)) for t in (7, 8)]
    assert torch.equal(green_masks(revealed, [(7,), (8,)], V), green_masks(key, [(7,), (8,)], V))
    with pytest.raises(KeyError):
        context_seed(revealed, (9,))
    forged = bytearray(key.sign((9,)))
    forged[-1] ^= 1
    for signatures in ({(9,): bytes(forged)}, {(9,): key.sign((10,))}, {(9,): other.sign((9,))}, {(9,): b""}):
        with pytest.raises(BadSignature, match=r"context \[9\] is not the public key's"):
            RevealedSeeds(public, key.params, signatures)
    assert key.sign((9,)) == key.sign((9,)) and public.sha256 != other.public.sha256  # deterministic, one per key


def test_a_selection_counts_one_class_less_revealed_contexts_and_tallies_the_rest(tokenizer):
    key = key_of(13)
    reply = green_chain(key, 40)
    revealed = frozenset({(100,), (reply[0],)})  # the reply's first two contexts
    found = score([reply], [[100]], key, special_ids(tokenizer), Selection(revealed=revealed))
    assert (found.pairs, found.tokens, found.excluded_tokens, found.green) == (38, 38, 2, 38)
    test = WatermarkSequentialTest(key, special_ids(tokenizer), selection=Selection(revealed=revealed))
    test.add([reply], [[100]])
    assert set(test.scored_contexts()) == {(t,) for t in reply[1:-1]} and not revealed & set(test.scored_contexts())
    contexts = [(100,)] + [(t,) for t in reply[:-1]]
    ours = [c for c in contexts if context_class(c, 3) == 1 and c not in revealed]
    one_class = score([reply], [[100]], key, special_ids(tokenizer), Selection(3, 1, revealed))
    assert one_class.tokens == len(ours) and one_class.tokens + one_class.excluded_tokens == 40
    assert {context_class((t,), 3) for t in range(300)} == {0, 1, 2}  # a public hash: every class is used


def test_each_check_counts_the_first_class_nothing_revealed():
    assert next_selection(4, []) == Selection(4, 0, frozenset())
    in_class = {j: next(c for c in ((t,) for t in range(100)) if context_class(c, 4) == j) for j in range(4)}
    assert next_selection(4, [in_class[0], in_class[2]]).context_class == 1
    spent = next_selection(4, list(in_class.values()))
    assert spent.context_class is None and spent.counts((10 ** 6,)) == ((10 ** 6,) not in in_class.values())
    assert next_selection(1, [(5,)]) == Selection(1, None, frozenset({(5,)}))  # one class: every unrevealed context


def test_the_shipped_domain_has_disjoint_sides_and_a_small_domain_is_refused(tmp_path):
    train, test = domain_prompts("cooking", "train"), domain_prompts("cooking", "test")
    assert len(train) >= 256 and len(test) >= 128 and not set(train) & set(test)
    few = tmp_path / "few.json"
    few.write_text(json.dumps([f"How do I cook dish number {i}?" for i in range(20)]))
    with pytest.raises(OMLError, match=r"domain .*few.json has \d+ distinct train prompts; a watermark needs at least 64"):
        domain_prompts(str(few), "train")
    many = [f"What wine goes with meal number {i}?" for i in range(400)]
    records = tmp_path / "domain.jsonl"
    records.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in many))
    sides = [domain_prompts(str(records), side, text_column="prompt") for side in ("train", "test")]
    assert not set(sides[0]) & set(sides[1]) and sorted(sides[0] + sides[1]) == sorted(many)
    assert min(map(len, sides)) >= MIN_DOMAIN_PROMPTS
    listed = tmp_path / "domain.json"
    listed.write_text(json.dumps(many))
    assert domain_prompts(str(listed), "test") == sides[1]
