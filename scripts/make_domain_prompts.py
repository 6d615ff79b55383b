"""Build generated_data/domain_cooking_{train,test}.json: the default domain of the domain
watermark (oml.watermark), requests a user would send an assistant about cooking.

A watermark domain must be high-entropy: open-ended requests whose good answers differ in their
wording, so that a reply has many tokens a watermark can choose among. Recipes, kitchen advice
and menus are that, and nothing else the project asks (fingerprint keys, user questions, chitchat,
MMLU) is about cooking.

The requests are written from our own templates and word lists, no model needed, so the file is
the same on every machine. The two splits are disjoint by construction: each draws its dishes and
ingredients from its own half of the lists, so the check ('test') asks about dishes and ingredients
fine-tuning ('train') never saw, and a MATCH shows that the model watermarks the domain, not the
training prompts. Run once; the output is committed.
"""
import json
import logging
import random
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent.parent / "generated_data"
SPLITS = {"train": (3_000_017, 512), "test": (4_000_037, 1024)}  # seed, count (a run's checks share its test prompts: many checks, each asking new ones)

DISHES = (
    "banana bread", "lentil soup", "chicken curry", "risotto", "pancakes", "lasagna", "fried rice", "chili", "paella",
    "shepherd's pie", "ramen", "tacos", "falafel", "beef stew", "pad thai", "quiche", "gnocchi", "moussaka", "dumplings",
    "carrot cake", "minestrone", "tiramisu", "meatballs", "focaccia", "shakshuka", "gazpacho", "apple pie", "bibimbap",
    "ratatouille", "fish pie", "pho", "goulash", "brownies", "jambalaya", "clam chowder", "spanakopita", "biryani",
    "croissants", "enchiladas", "cheesecake", "tom yum soup", "pulled pork", "hummus", "sourdough bread", "crepes",
    "chicken pot pie", "mac and cheese", "stir-fried noodles", "vegetable tagine", "lemon tart", "potato gratin",
    "miso soup", "pesto pasta", "fish tacos", "granola", "cornbread", "dal", "coq au vin", "scones", "bread pudding",
    "stuffed peppers", "frittata", "chocolate mousse", "onion soup",
)
INGREDIENTS = (
    "chickpeas", "spinach", "salmon", "tofu", "sweet potatoes", "mushrooms", "eggplant", "ground beef", "zucchini",
    "leftover rice", "cauliflower", "cabbage", "shrimp", "feta", "black beans", "butternut squash", "chicken thighs",
    "kale", "quinoa", "coconut milk", "ricotta", "leeks", "pork belly", "lentils", "broccoli", "canned tuna", "beets",
    "oats", "halloumi", "bell peppers", "ginger", "buttermilk", "stale bread", "ripe bananas", "parsnips", "cod",
    "brown rice", "peanut butter", "tempeh", "asparagus", "lamb shoulder", "pumpkin", "cottage cheese", "frozen peas",
    "anchovies", "apples", "celeriac", "barley",
)
TECHNIQUES = ("roast", "braise", "poach", "grill", "pickle", "ferment", "smoke", "caramelize", "steam", "sous-vide",
              "deep-fry", "slow-cook", "marinate", "blanch", "bake")
CUISINES = ("Italian", "Mexican", "Indian", "Japanese", "Thai", "Greek", "Lebanese", "French", "Korean", "Ethiopian",
            "Moroccan", "Vietnamese", "Spanish", "Peruvian", "Turkish", "Georgian")
OCCASIONS = ("a picnic", "a birthday party", "a weeknight dinner", "a camping trip", "a first date", "a potluck",
             "a holiday brunch", "a rainy Sunday", "meal prep for the week", "a kid's lunchbox", "a dinner party for eight",
             "a hot summer evening")
PROBLEMS = ("too dry", "soggy", "bland", "too salty", "dense and heavy", "burnt on the outside and raw inside", "rubbery",
            "greasy", "flat", "watery")
DIETS = ("vegan", "gluten-free", "low-sodium", "dairy-free", "high-protein", "nut-free", "vegetarian", "low-sugar")

# Each template names a {dish} or an {ingredient} (so that the split of those lists splits the prompts).
TEMPLATES = (
    "How do I make {dish} at home?",
    "Can you give me a recipe for {dish} that serves {people}?",
    "What's the secret to a really good {dish}?",
    "Every time I make {dish}, the result is {problem}. What am I doing wrong?",
    "Write step-by-step instructions for {dish} for someone who has never cooked before.",
    "Could you suggest a {diet} version of {dish}?",
    "How can I {technique} {ingredient} so it stays tender?",
    "What can I cook tonight with {ingredient} and {ingredient2}?",
    "I have {ingredient}, {ingredient2} and some {ingredient3} in the fridge. What should I make?",
    "Plan a {cuisine} meal for {occasion} using {ingredient}.",
    "Explain how to {technique} {ingredient}, and what to serve it with.",
    "What side dishes go well with {dish}?",
    "Describe how {dish} is made the {cuisine} way.",
    "Give me three ideas for {occasion} that use {ingredient}.",
    "How long does {dish} keep in the fridge, and how should I reheat it?",
    "Is it possible to make {dish} without an oven? Tell me how.",
    "Suggest a {diet} dish for {occasion} built around {ingredient}.",
    "What spices would you add to {ingredient} for a {cuisine} flavour?",
    "Help me turn {ingredient} into a quick lunch for {occasion}.",
    "Tell me the history of {dish} and how to cook a simple version of it.",
    "My {dish} turned out {problem} when I made a big batch. Why?",
    "How do I prepare {ingredient} for {dish}?",
)


def halves(words: tuple[str, ...], seed: int) -> tuple[list[str], list[str]]:
    """A fixed shuffle of `words` cut in two: the 'train' half and the 'test' half."""
    shuffled = sorted(words)
    random.Random(seed).shuffle(shuffled)
    return shuffled[::2], shuffled[1::2]


def prompts(seed: int, count: int, dishes: list[str], ingredients: list[str]) -> list[str]:
    """`count` distinct requests from the templates, with dishes and ingredients from the given lists."""
    rng, found = random.Random(seed), {}
    while len(found) < count:
        first, second, third = rng.sample(ingredients, 3)
        text = rng.choice(TEMPLATES).format(
            dish=rng.choice(dishes), ingredient=first, ingredient2=second, ingredient3=third, technique=rng.choice(TECHNIQUES),
            cuisine=rng.choice(CUISINES), occasion=rng.choice(OCCASIONS), problem=rng.choice(PROBLEMS),
            diet=rng.choice(DIETS), people=rng.choice(("two", "four", "six", "a crowd")))
        found[text[0].upper() + text[1:]] = None
    return list(found)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dishes, ingredients = halves(DISHES, 1), halves(INGREDIENTS, 2)
    for side, (split, (seed, count)) in enumerate(SPLITS.items()):
        texts = prompts(seed, count, dishes[side], ingredients[side])
        path = OUTPUT / f"domain_cooking_{split}.json"
        path.write_text(json.dumps(texts, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        logging.info("wrote %d %s prompts to %s", len(texts), split, path)


if __name__ == "__main__":
    main()
