"""Short made-up names: two or three syllables of consonant-vowel(-consonant), so BPE learns them as 1-3 tokens."""

import random


ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "th"]
VOWELS = ["a", "e", "i", "o", "u"]
CODAS = ["", "", "", "n", "r", "l", "s", "k", "m"]


def make_name(rng: random.Random, syllables: int) -> str:
    """One capitalised made-up word such as `Bako` or `Tarmil`."""
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables - 1)]
    parts.append(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS))
    return "".join(parts).capitalize()


def unique_names(rng: random.Random, count: int, taken: set[str], syllables: tuple[int, ...] = (2, 3)) -> list[str]:
    """`count` new names, none in `taken` (which is updated), drawn in a fixed order so a seed fixes them all."""
    names = []
    while len(names) < count:
        name = make_name(rng, rng.choice(syllables))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names
