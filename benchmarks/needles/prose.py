"""A haystack of plain narrative prose, drawn from a small grammar, for smol-vl's long contexts.

RULER's "repeat" haystack (``suite.FILLER``, five short sentences over and over) is what SmolLM2-135M cannot read
past: at 1k-4k tokens it copies the filler into its answer ("The key is There and back again."), full cache or
not. A pretrained LM of that size answers from prose (the demo's story question), so the long smol-vl contexts use
sentences like "Late that evening the ferryman counted the nets beside the old mill." Every sentence is drawn from
the grammar below with the sample's ``random.Random``, so a prompt is as reproducible as the rest of the suite.

The vocabulary leaves out every word a task asks for or answers with (colours, shapes, numbers, the suite's keys,
what a box holds, "key", "box", "image", "shape"), so the haystack never holds a competing answer; a test checks
that over thousands of sentences.
"""

from __future__ import annotations

import random

_PEOPLE = (
    "the ferryman",
    "the baker",
    "the old teacher",
    "the harbour master",
    "a young carpenter",
    "the miller's daughter",
    "the doctor",
    "a travelling tailor",
    "the innkeeper",
    "the shepherd",
    "the village clerk",
    "a fisherwoman",
    "the blacksmith",
    "the postman",
    "the widow next door",
    "a boy from the farm",
)
_NAMES = ("Tomas", "Elin", "Marta", "Hugo", "Ines", "Oskar", "Nora", "Felix", "Greta", "Jonah", "Lena", "Rafael")
_PLACES = (
    "by the harbour wall",
    "at the edge of the village",
    "beside the old mill",
    "on the road to the coast",
    "in the market place",
    "under the bridge",
    "behind the chapel",
    "at the top of the hill",
    "near the bakery",
    "along the canal",
    "outside the inn",
    "in the narrow lane",
)
_TIMES = (
    "early in the morning",
    "late that evening",
    "after the rain",
    "before the market opened",
    "on the following day",
    "at noon",
    "during the long winter",
    "when the tide went out",
    "at dusk",
    "that summer",
)
_ACTIONS = (
    "mended the nets",
    "swept the steps",
    "carried bread to the neighbours",
    "wrote a letter to a cousin",
    "waited for the ferry",
    "repaired a broken fence",
    "watched the boats come in",
    "sang an old song",
    "walked slowly home",
    "fed the chickens",
    "counted the sacks of flour",
    "read the newspaper aloud",
    "talked about the weather",
    "lit a fire in the kitchen",
    "painted the door of the shed",
    "planted beans in the yard",
)
_THINGS = ("the weather", "the harvest", "the new road", "the price of flour", "the wedding", "the old ship")
_MOODS = ("quiet", "busy", "cold", "calm", "crowded", "still", "damp", "bright")
_SPOTS = ("the market", "the harbour", "the lane", "the kitchen", "the chapel", "the mill", "the inn", "the beach")
_TEMPLATES = (
    "{Time}, {person} {action} {place}.",
    "{Person} {action} {place} {time}.",
    "{Name} {action} {time}.",
    "{Spot} was {mood} {time}.",
    "{Name} and {person} talked about {thing} {place}.",
    "Nobody {place} could remember {thing} any more.",
    "{Person} said that {thing} would change everything.",
    "{Time}, {name} heard the horn of the ferry.",
    "{Name} knew that {person} always {action} {time}.",
    "It was {mood} {place}, and {person} {action}.",
)


def prose_sentences(rng: random.Random, count: int) -> list[str]:
    """``count`` sentences of the grammar, drawn with ``rng`` (about 14 tokens each in SmolLM2's tokenizer)."""
    return [_sentence(rng) for _ in range(count)]


def _sentence(rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES)
    words = {
        "time": rng.choice(_TIMES),
        "person": rng.choice(_PEOPLE),
        "name": rng.choice(_NAMES),
        "place": rng.choice(_PLACES),
        "action": rng.choice(_ACTIONS),
        "thing": rng.choice(_THINGS),
        "mood": rng.choice(_MOODS),
        "spot": rng.choice(_SPOTS),
    }
    words |= {key.capitalize(): _capitalised(value) for key, value in words.items()}
    return template.format(**words)


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]
