"""The embedded default corpus: a seeded generator of short, grammatical English sentences (written for DiffRwkv).

The offline demo trains a tiny model on a few thousand of these on a laptop CPU, so the corpus is built to make
text <-> latent learnable and checkable: a small vocabulary (~300 words) in a few sentence patterns, where every
slot (who, doing what, to what, where, when, how many, what colour) changes the meaning and therefore the
sentence embedding. Each sentence comes with its slots, so a decoded sentence can be checked slot by slot.

    from rwkv_diffusion_rnn.corpus import generate, generate_records
    generate(3, seed=0)      # ['A tired farmer carries a green basket across the bridge.', ...]

    diffrwkv make-corpus --n 4000 --seed 0 --output corpus.txt          # one sentence per line
    diffrwkv make-corpus --n 4000 --format jsonl --output corpus.jsonl  # {"text", "slots"} per line

Same (n, seed) -> same list on every platform (``random.Random`` with an integer seed is specified to be stable).
Sentences are distinct, 5 to 20 words, capitalised, ending in '.' or '?'.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rwkv_diffusion_rnn.data_io import atomic_write_bytes
from rwkv_diffusion_rnn.errors import DiffRwkvError

# nouns: (singular, plural)
PEOPLE = [("man", "men"), ("woman", "women"), ("boy", "boys"), ("girl", "girls"), ("child", "children"),
          ("teacher", "teachers"), ("doctor", "doctors"), ("farmer", "farmers"), ("painter", "painters"),
          ("student", "students"), ("cook", "cooks"), ("sailor", "sailors"), ("baker", "bakers"),
          ("musician", "musicians"), ("fisherman", "fishermen"), ("nurse", "nurses")]  # fmt: skip
ANIMALS = [("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("bird", "birds"), ("cow", "cows"),
           ("rabbit", "rabbits"), ("duck", "ducks"), ("fox", "foxes"), ("goat", "goats"),
           ("puppy", "puppies")]  # fmt: skip
PERSON_ADJ = [
    "tall",
    "short",
    "old",
    "young",
    "happy",
    "tired",
    "quiet",
    "busy",
    "angry",
    "friendly",
    "sleepy",
    "brave",
]
ANIMAL_ADJ = ["small", "big", "old", "young", "hungry", "lazy", "playful", "sleepy", "wet", "noisy"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "gray", "pink"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
OBJECTS = {
    "carry": [("bag", "bags"), ("box", "boxes"), ("basket", "baskets"), ("umbrella", "umbrellas"),
              ("bucket", "buckets"),
              ("lamp", "lamps"), ("chair", "chairs"), ("book", "books"), ("cup", "cups")],
    "food": [("apple", "apples"), ("sandwich", "sandwiches"), ("orange", "oranges"), ("cake", "cakes"),
             ("carrot", "carrots"), ("pear", "pears"), ("cookie", "cookies"), ("egg", "eggs")],
    "read": [("letter", "letters"), ("book", "books"), ("map", "maps"), ("newspaper", "newspapers"), ("note", "notes")],
    "write": [("letter", "letters"), ("note", "notes"), ("story", "stories"), ("poem", "poems"), ("list", "lists")],
    "toy": [("ball", "balls"), ("stick", "sticks"), ("kite", "kites"), ("frisbee", "frisbees")],
    "build": [("fence", "fences"), ("boat", "boats"), ("table", "tables"), ("wall", "walls"), ("bicycle", "bicycles"),
              ("door", "doors"), ("kite", "kites"), ("shed", "sheds")],
}  # fmt: skip
ANIMAL_FOOD = [("apple", "apples"), ("carrot", "carrots"), ("bone", "bones"), ("fish", "fish"), ("pear", "pears")]
# verbs: (base, 3rd person singular, -ing, past), object class, who may do it
TRANSITIVE = [
    (("carry", "carries", "carrying", "carried"), "carry", "person"),
    (("hold", "holds", "holding", "held"), "carry", "person"),
    (("drop", "drops", "dropping", "dropped"), "carry", "person"),
    (("eat", "eats", "eating", "ate"), "food", "person"),
    (("buy", "buys", "buying", "bought"), "food", "person"),
    (("read", "reads", "reading", "read"), "read", "person"),
    (("write", "writes", "writing", "wrote"), "write", "person"),
    (("throw", "throws", "throwing", "threw"), "toy", "person"),
    (("catch", "catches", "catching", "caught"), "toy", "person"),
    (("paint", "paints", "painting", "painted"), "build", "person"),
    (("fix", "fixes", "fixing", "fixed"), "build", "person"),
    (("build", "builds", "building", "built"), "build", "person"),
    (("chase", "chases", "chasing", "chased"), "toy", "animal"),
    (("eat", "eats", "eating", "ate"), "animal_food", "animal"),
    (("find", "finds", "finding", "found"), "toy", "animal"),
]
INTRANSITIVE = [
    (("walk", "walks", "walking", "walked"), "any"), (("run", "runs", "running", "ran"), "any"),
    (("sit", "sits", "sitting", "sat"), "any"), (("sleep", "sleeps", "sleeping", "slept"), "any"),
    (("wait", "waits", "waiting", "waited"), "any"), (("play", "plays", "playing", "played"), "any"),
    (("sing", "sings", "singing", "sang"), "person"), (("dance", "dances", "dancing", "danced"), "person"),
    (("work", "works", "working", "worked"), "person"), (("rest", "rests", "resting", "rested"), "any"),
]  # fmt: skip
PLACES = ["in the park", "on the beach", "near the river", "in the kitchen", "at the market", "on the bridge",
          "in the garden", "behind the house", "under the tree", "at the station", "in the forest", "on the hill",
          "by the lake", "in the city square", "next to the school", "on the farm", "in the snow",
          "on the street"]  # fmt: skip
TIMES = ["in the morning", "at night", "after lunch", "every day", "on Sunday", "before dinner", "in the evening",
         "at noon", "in the winter", "in the summer", "after school", "on a rainy day"]  # fmt: skip


@dataclass
class Sentence:
    text: str
    slots: dict[str, str] = field(default_factory=dict)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Builder:
    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def subject(self, kind: str, plural: bool, slots: dict) -> str:
        noun = self.r.choice(PEOPLE if kind == "person" else ANIMALS)
        adj = self.r.choice(PERSON_ADJ if kind == "person" else ANIMAL_ADJ) if self.r.random() < 0.6 else None
        slots.update(subject=noun[0], subject_adj=adj or "")
        words = [adj] if adj else []
        if plural:
            num = self.r.choice(NUMBERS)
            slots["subject_number"] = num
            return " ".join([num, *words, noun[1]])
        words.append(noun[0])
        det = self.r.choice(["the", _article(words[0])])
        return " ".join([det, *words])

    def obj(self, cls: str, slots: dict) -> str:
        noun = self.r.choice(ANIMAL_FOOD if cls == "animal_food" else OBJECTS[cls])
        colour = self.r.choice(COLOURS) if cls in ("carry", "toy", "build") and self.r.random() < 0.7 else None
        slots.update(object=noun[0], colour=colour or "")
        if self.r.random() < 0.25:
            num = self.r.choice(NUMBERS)
            slots["object_number"] = num
            return " ".join(w for w in (num, colour, noun[1]) if w)
        head = colour or noun[0]
        return " ".join(w for w in (self.r.choice(["the", _article(head)]), colour, noun[0]) if w)

    def tail(self, slots: dict, p_place: float = 0.8, p_time: float = 0.4) -> list[str]:
        out = []
        if self.r.random() < p_place:
            slots["place"] = self.r.choice(PLACES)
            out.append(slots["place"])
        if self.r.random() < p_time:
            slots["time"] = self.r.choice(TIMES)
            out.append(slots["time"])
        return out


def _one(b: _Builder) -> Sentence:
    r, slots = b.r, {}
    pattern = r.choices(["transitive", "intransitive", "there", "question", "past"], weights=[5, 3, 1, 1, 2])[0]
    slots["pattern"] = pattern
    if pattern == "there":
        obj = b.obj(r.choice(["carry", "toy", "build", "food"]), slots)
        words = obj.split()
        plural = "object_number" in slots
        words = words[1:] if words[0] in ("a", "an", "the") else words
        if not plural:
            words = [_article(words[0]), *words]
        place = r.choice(PLACES)
        slots["place"] = place
        text = f"There {'are' if plural else 'is'} {' '.join(words)} {place}."
        return Sentence(text[0].upper() + text[1:], slots)
    if pattern in ("transitive", "past", "question"):
        verb, cls, who = r.choice(TRANSITIVE)
    else:
        verb, who = r.choice(INTRANSITIVE)
        cls = None
    kind = who if who != "any" else r.choice(["person", "animal"])
    plural = r.random() < 0.3
    subj = b.subject(kind, plural, slots)
    slots["verb"] = verb[0]
    obj = [b.obj(cls, slots)] if cls else []
    if pattern == "question":
        aux = "Are" if plural else "Is"
        rest = b.tail(slots, p_place=0.7, p_time=0.0)
        return Sentence(" ".join([aux, subj, verb[2], *obj, *rest]) + "?", slots)
    if pattern == "past":
        slots["tense"] = "past"
        words = [subj, verb[3], *obj, *b.tail(slots, p_time=0.0)]
        lead = r.choice(["Yesterday,", "Last week,", "This morning,", None])
        words = [lead, *words] if lead else words
    else:
        progressive = r.random() < 0.4
        slots["tense"] = "progressive" if progressive else "present"
        v = ([("are" if plural else "is"), verb[2]]) if progressive else [verb[0] if plural else verb[1]]
        words = [subj, *v, *obj, *b.tail(slots)]
    text = " ".join(w for w in words if w) + "."
    return Sentence(text[0].upper() + text[1:], slots)


def generate_records(n: int, seed: int = 0) -> list[Sentence]:
    """``n`` distinct sentences with their slots; deterministic in (n, seed)."""
    if n < 0:
        raise DiffRwkvError(f"n is {n}; expected >= 0")
    b = _Builder(random.Random(seed))
    seen: set[str] = set()
    out: list[Sentence] = []
    misses = 0  # consecutive draws that gave nothing new: the space (millions of sentences) is running out
    while len(out) < n:
        s = _one(b)
        if s.text in seen or not 5 <= len(s.text.split()) <= 20:
            misses += 1
            if misses > 10_000:
                raise DiffRwkvError(f"only {len(out)} distinct sentences found; expected {n} (ask for fewer)")
            continue
        misses = 0
        seen.add(s.text)
        out.append(s)
    return out


def generate(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences; deterministic in (n, seed) (a prefix of a larger ``n`` with the same seed)."""
    return [s.text for s in generate_records(n, seed)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="diffrwkv make-corpus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=4000, help="number of distinct sentences")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--format", choices=["txt", "jsonl"], default="txt", help="txt: one per line; jsonl: text + slots")
    p.add_argument("--output", default="-", help="output file ('-': stdout); written atomically")
    args = p.parse_args(argv)
    records = generate_records(args.n, args.seed)
    if args.format == "txt":
        body = "".join(s.text + "\n" for s in records)
    else:
        body = "".join(json.dumps({"text": s.text, "slots": s.slots}) + "\n" for s in records)
    if args.output == "-":
        sys.stdout.write(body)
    else:
        atomic_write_bytes(Path(args.output), body.encode("utf-8"))
        print(f"wrote {len(records)} sentences to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from rwkv_diffusion_rnn.entry import run_main

    sys.exit(run_main(main, None))
