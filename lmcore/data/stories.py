"""A built-in corpus that needs no network: seeded, generated simple English stories.

Stories have characters (some with non-ASCII names), invented places, actions, dialogue, numbers
and the odd emoji, and end with ``<|endoftext|>``. The same seed always gives the same text, and
any size can be asked for.
"""

from __future__ import annotations

import random
from typing import Iterator

END_OF_TEXT = "<|endoftext|>"

NAMES = ["Lily", "Tom", "Mia", "Ben", "Zoë", "José", "Chloé", "Björn", "Anaïs", "Sam", "Ava", "Leo",
         "Noah", "Emma", "Søren", "Renée", "Max", "Ella", "Finn", "Ruby", "Jack", "Nora", "Omar",
         "Yuki", "Priya", "Mateo", "Åsa", "Ümit", "Lucía", "Kai", "Hana", "Olga", "Pablo", "Ines"]
ANIMALS = ["dog", "cat", "bird", "rabbit", "fox", "owl", "frog", "bear", "duck", "mouse", "horse",
           "turtle", "squirrel", "puppy", "kitten", "dragon", "fish", "goat"]
OBJECTS = ["ball", "kite", "box", "book", "hat", "cake", "boat", "lamp", "key", "map", "shell",
           "drum", "apple", "flower", "rock", "blanket", "cup", "train", "robot", "balloon"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "white", "golden"]
ADJECTIVES = ["big", "small", "happy", "sad", "shiny", "soft", "tiny", "old", "funny", "brave",
              "quiet", "loud", "kind", "sleepy", "curious", "clever", "silly", "gentle"]
FEELINGS = ["happy", "sad", "excited", "scared", "proud", "tired", "surprised", "angry", "calm"]
VERBS = ["found", "saw", "lost", "made", "painted", "carried", "shared", "hid", "fixed", "dropped",
         "washed", "counted", "opened", "chased", "built", "sold", "bought", "threw"]
PLACES = ["park", "forest", "beach", "garden", "school", "river", "hill", "market", "castle",
          "library", "farm", "kitchen", "lake", "cave", "bakery", "station"]
SYLLABLES = ["bel", "mor", "ka", "tin", "ro", "vi", "lan", "dor", "sen", "mi", "tra", "qu", "zel",
             "fa", "nu", "gor", "pel", "ash", "wyn", "li", "bra", "to", "é", "ån"]
SUFFIXES = ["ford", "ville", "ton", "wick", " Bay", " Hill", "by", "mouth", "holm", "stadt"]
EMOJI = ["🙂", "🌟", "🐶", "🎈", "🍎", "🚂", "🌈"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


class _Story:
    """One story's cast and props, with sentence makers drawing on a shared random generator."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.hero, self.friend = rng.sample(NAMES, 2)
        self.animal = rng.choice(ANIMALS)
        self.thing = rng.choice(OBJECTS)
        self.color = rng.choice(COLORS)
        self.place = rng.choice(PLACES)
        syllables = rng.randint(2, 3)
        self.town = "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize() + rng.choice(SUFFIXES)

    def pick(self, items):
        return self.rng.choice(items)

    def number(self) -> str:
        r = self.rng.random()
        if r < 0.5:
            return str(self.rng.randint(2, 20))
        if r < 0.8:
            return str(self.rng.randint(21, 999))
        return str(self.rng.randint(1000, 99999))

    def opening(self) -> str:
        return self.pick([
            f"Once upon a time, in a town called {self.town}, there was a {self.pick(ADJECTIVES)} "
            f"{self.animal} named {self.hero}.",
            f"One {self.pick(WEEKDAYS)}, {self.hero} went to the {self.place} with {self.friend}.",
            f"{self.hero} was {self.rng.randint(3, 12)} years old and lived near the {self.place} "
            f"in {self.town}.",
            f"In the year {self.rng.randint(1800, 2099)}, a {self.color} {self.thing} appeared in {self.town}.",
        ])

    def middle(self) -> str:
        n = self.number()
        return self.pick([
            f"{self.hero} {self.pick(VERBS)} a {self.pick(ADJECTIVES)} {self.color} {self.thing}.",
            f"\"Look, {self.friend}!\" said {self.hero}. \"I {self.pick(VERBS)} {n} {self.thing}s!\"",
            f"\"Can we go to the {self.pick(PLACES)}?\" asked {self.friend}. \"Yes,\" said {self.hero}, "
            f"\"but only for {n} minutes.\"",
            f"The {self.animal} felt {self.pick(FEELINGS)} because the {self.thing} was {self.pick(ADJECTIVES)}.",
            f"They walked {n} steps to the {self.pick(PLACES)} and {self.pick(VERBS)} a {self.pick(OBJECTS)}.",
            f"It cost €{self.rng.randint(1, 99)}.{self.rng.randint(0, 99):02d}, so {self.hero} counted "
            f"the coins: {', '.join(str(self.rng.randint(1, 50)) for _ in range(3))}.",
            f"{self.friend} didn't want to share, but {self.hero} said, \"It's okay, we'll take turns.\"",
            f"At {self.rng.randint(1, 12)} o'clock the sky turned {self.pick(COLORS)} {self.pick(EMOJI)}",
            f"Suddenly, a {self.pick(ADJECTIVES)} {self.pick(ANIMALS)} ran out of the {self.pick(PLACES)}!",
            f"\"Why is the {self.thing} {self.color}?\" wondered {self.hero}.",
        ])

    def ending(self) -> str:
        return self.pick([
            f"In the end, {self.hero} and {self.friend} were {self.pick(FEELINGS)} and went home.",
            f"From that day on, {self.hero} always kept the {self.thing} close.",
            f"{self.hero} learned that sharing makes everyone {self.pick(FEELINGS)}.",
            f"The end. {self.pick(EMOJI)}",
        ])


def story(rng: random.Random) -> str:
    """One story (without the end-of-text marker)."""
    s = _Story(rng)
    sentences = [s.opening()] + [s.middle() for _ in range(rng.randint(3, 9))] + [s.ending()]
    paragraphs, i = [], 0
    while i < len(sentences):
        step = rng.randint(2, 4)
        paragraphs.append(" ".join(sentences[i:i + step]))
        i += step
    return "\n\n".join(paragraphs)


def iter_stories(seed: int = 0) -> Iterator[str]:
    """An endless, reproducible stream of stories, each ending with ``<|endoftext|>``."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative integer")
    rng = random.Random(seed)
    while True:
        yield story(rng) + END_OF_TEXT


def builtin_corpus(num_bytes: int, seed: int = 0) -> str:
    """Whole stories, as many as fit in ``num_bytes`` bytes of UTF-8 (at least one story)."""
    if not isinstance(num_bytes, int) or isinstance(num_bytes, bool) or num_bytes <= 0:
        raise ValueError(f"num_bytes={num_bytes!r}: expected a positive integer")
    parts, total = [], 0
    for text in iter_stories(seed):
        size = len(text.encode("utf-8"))
        if parts and total + size > num_bytes:
            break
        parts.append(text)
        total += size
    return "".join(parts)
