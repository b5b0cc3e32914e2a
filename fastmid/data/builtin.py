"""``builtin:arith``: a seeded generator of GSM8K-style arithmetic word problems.

Each problem is one of 12 templates with 2 to 4 arithmetic steps (``+``, ``-``, ``*``, exact
``/``) on small integers (operands 1-500, every intermediate value a positive integer below
1000), filled with names from a list of 24 and items from a list of 10. The answer is written
step by step, one sentence per step with the computation spelled out (``12 + 5 = 17``), and ends in
GSM8K's final-answer line ``#### <number>`` (without GSM8K's ``<<12+5=17>>`` calculator
annotations). Rows have GSM8K's columns, ``question`` and ``answer``.

Splits: ``train`` (5000 problems, generator seed 20240601) and ``test`` (500 problems, seed
20240602). They are disjoint by construction: a problem's identity is its template and its numbers
(names and items are surface only), and the SHA-256 of that identity puts every problem in exactly
one split (``test`` when the hash is 0 mod 5), so no computation of the test split appears in
``train`` under another name. Within a split every identity appears once. The generator is pure
Python ``random.Random``, so the sets are the same on every machine and Python version >= 3.2.

``builtin:arith-unseen`` (split ``test`` only): 134 hand-written two-step problems in phrasings,
names and items the generator never uses, stored as ``fastmid/data/sets/arith_unseen.jsonl`` (see
the README there). It is a held-out check that a gain on ``builtin:arith:test`` is not memorized
templates; it has no ``train`` split, so ``--data builtin:arith-unseen`` refuses to train on it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

from fastmid.data.schema import DataError

SPLIT_SIZES: dict[str, int] = {"train": 5000, "test": 500}
SPLIT_SEEDS: dict[str, int] = {"train": 20240601, "test": 20240602}
TEST_BUCKETS = 5  # identity hash 0 mod 5 -> test, the rest -> train
BUILTINS: tuple[str, ...] = ("arith", "arith-unseen")
SETS_DIR = Path(__file__).with_name("sets")
#: Built-in sets stored as JSON-lines files in :data:`SETS_DIR`: name -> (file, its one split,
#: SHA-256 of the file). The digest pins the file: the tokenization cache keys a built-in set by
#: fastmid's code, not by the file's bytes, so an edited file must come with its new digest here.
FILE_SETS: dict[str, tuple[str, str, str]] = {
    "arith-unseen": (
        "arith_unseen.jsonl",
        "test",
        "1939c3f1f8faae650566c43a5850ea6a590a27e429a4d0b9241e2ca34e3eae09",
    ),
}

# (name, subject pronoun, object pronoun, possessive)
NAMES: tuple[tuple[str, str, str, str], ...] = (
    ("Ava", "she", "her", "her"),
    ("Liam", "he", "him", "his"),
    ("Mia", "she", "her", "her"),
    ("Noah", "he", "him", "his"),
    ("Zoe", "she", "her", "her"),
    ("Omar", "he", "him", "his"),
    ("Priya", "she", "her", "her"),
    ("Kenji", "he", "him", "his"),
    ("Lucia", "she", "her", "her"),
    ("Mateo", "he", "him", "his"),
    ("Amara", "she", "her", "her"),
    ("Ethan", "he", "him", "his"),
    ("Hana", "she", "her", "her"),
    ("Diego", "he", "him", "his"),
    ("Fatima", "she", "her", "her"),
    ("Lars", "he", "him", "his"),
    ("Chloe", "she", "her", "her"),
    ("Kwame", "he", "him", "his"),
    ("Ines", "she", "her", "her"),
    ("Ravi", "he", "him", "his"),
    ("Sofia", "she", "her", "her"),
    ("Yusuf", "he", "him", "his"),
    ("Elena", "she", "her", "her"),
    ("Tomas", "he", "him", "his"),
)
ITEMS: tuple[str, ...] = (
    "apples",
    "stickers",
    "marbles",
    "pencils",
    "cookies",
    "books",
    "cards",
    "shells",
    "stamps",
    "beads",
)

# a template returns (numbers that identify the problem, question, answer steps, final answer)
Problem = tuple[tuple[int, ...], str, list[str], int]
Template = Callable[[random.Random], "Problem | None"]


def _people(rng: random.Random, k: int) -> list[tuple[str, str, str, str]]:
    return rng.sample(NAMES, k)


def _t_buy_give(rng: random.Random) -> Problem | None:
    (a_name, sub, _, _), (b_name, *_) = _people(rng, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    x = a + b
    c = rng.randint(1, x - 1)
    y = x - c
    q = (
        f"{a_name} has {a} {item}. {sub.capitalize()} buys {b} more and then gives {c} to "
        f"{b_name}. How many {item} does {a_name} have now?"
    )
    steps = [
        f"{a_name} starts with {a} {item} and buys {b} more, so {sub} has {a} + {b} = {x} {item}.",
        f"After giving {c} to {b_name}, {sub} has {x} - {c} = {y} {item}.",
    ]
    return (a, b, c), q, steps, y


def _t_packs(rng: random.Random) -> Problem | None:
    ((name, sub, _, _),) = _people(rng, 1)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    x = a * b
    c = rng.randint(1, x - 1)
    q = (
        f"{name} buys {a} packs of {item} with {b} {item} in each pack. {sub.capitalize()} gives "
        f"away {c} {item}. How many {item} does {name} have left?"
    )
    steps = [
        f"{name} buys {a} * {b} = {x} {item}.",
        f"After giving away {c}, {sub} has {x} - {c} = {x - c} {item} left.",
    ]
    return (a, b, c), q, steps, x - c


def _t_change(rng: random.Random) -> Problem | None:
    ((name, sub, _, _),) = _people(rng, 1)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 12), rng.randint(2, 20)
    x = a * b
    bill = next(v for v in (10, 20, 50, 100, 200, 500) if v > x)
    q = (
        f"{name} buys {a} {item} at ${b} each and pays with a ${bill} bill. How many dollars of "
        f"change does {sub} get?"
    )
    steps = [
        f"The {item} cost {a} * {b} = {x} dollars.",
        f"The change is {bill} - {x} = {bill - x} dollars.",
    ]
    return (a, b, bill), q, steps, bill - x


def _t_share(rng: random.Random) -> Problem | None:
    ((name, _, _, _),) = _people(rng, 1)
    item = rng.choice(ITEMS)
    c = rng.randint(2, 9)
    each = rng.randint(2, 15)
    x = c * each
    a = rng.randint(1, x - 1)
    b = x - a
    q = (
        f"There are {a} {item} in a box. {name} puts in {b} more, and then the {item} are shared "
        f"equally among {c} children. How many {item} does each child get?"
    )
    steps = [
        f"After {name} adds {b}, the box holds {a} + {b} = {x} {item}.",
        f"Shared among {c} children, each child gets {x} / {c} = {each} {item}.",
    ]
    return (a, b, c), q, steps, each


def _t_bakery(rng: random.Random) -> Problem | None:
    a, b, c = rng.randint(2, 8), rng.randint(3, 12), rng.randint(2, 7)
    per_day = a * b
    total = per_day * c
    d = rng.randint(1, total - 1)
    q = (
        f"A bakery makes {a} trays of cookies with {b} cookies on each tray every day. After {c} "
        f"days it has sold {d} cookies. How many cookies are left?"
    )
    steps = [
        f"Each day the bakery makes {a} * {b} = {per_day} cookies.",
        f"In {c} days it makes {per_day} * {c} = {total} cookies.",
        f"After selling {d}, there are {total} - {d} = {total - d} cookies left.",
    ]
    return (a, b, c, d), q, steps, total - d


def _t_wages(rng: random.Random) -> Problem | None:
    ((name, sub, _, _),) = _people(rng, 1)
    a, b, c = rng.randint(5, 20), rng.randint(2, 8), rng.randint(2, 8)
    hours = b + c
    pay = a * hours
    d = rng.randint(1, pay - 1)
    q = (
        f"{name} earns ${a} per hour. {sub.capitalize()} works {b} hours on Monday and {c} hours "
        f"on Tuesday, then spends ${d} on groceries. How many dollars of this pay does {name} "
        "have left?"
    )
    steps = [
        f"{name} works {b} + {c} = {hours} hours.",
        f"{sub.capitalize()} earns {a} * {hours} = {pay} dollars.",
        f"After spending {d}, {sub} has {pay} - {d} = {pay - d} dollars left.",
    ]
    return (a, b, c, d), q, steps, pay - d


def _t_reading(rng: random.Random) -> Problem | None:
    ((name, _, _, _),) = _people(rng, 1)
    a, b, c, d = rng.randint(5, 30), rng.randint(2, 9), rng.randint(5, 30), rng.randint(2, 9)
    x, y = a * b, c * d
    q = (
        f"{name} reads {a} pages a day for {b} days, then {c} pages a day for {d} days. How many "
        f"pages does {name} read in total?"
    )
    steps = [
        f"In the first {b} days {name} reads {a} * {b} = {x} pages.",
        f"In the next {d} days {name} reads {c} * {d} = {y} pages.",
        f"In total {name} reads {x} + {y} = {x + y} pages.",
    ]
    return (a, b, c, d), q, steps, x + y


def _t_shop(rng: random.Random) -> Problem | None:
    item = rng.choice(ITEMS)
    a = rng.randint(20, 90)
    b = rng.randint(1, a - 2)
    c = rng.randint(1, a - b - 1)
    d = rng.randint(5, 50)
    x = a - b
    y = x - c
    q = (
        f"A shop has {a} {item}. It sells {b} in the morning and {c} in the afternoon, and then a "
        f"delivery brings {d} more. How many {item} does the shop have at the end of the day?"
    )
    steps = [
        f"After the morning the shop has {a} - {b} = {x} {item}.",
        f"After the afternoon it has {x} - {c} = {y} {item}.",
        f"With the delivery it has {y} + {d} = {y + d} {item}.",
    ]
    return (a, b, c, d), q, steps, y + d


def _t_teams(rng: random.Random) -> Problem | None:
    a, b, d = rng.randint(2, 8), rng.randint(10, 30), rng.randint(2, 6)
    total = a * b
    c = total % d + d * rng.randint(0, 2)
    if c < 1 or c >= total:
        return None
    present = total - c
    q = (
        f"A school has {a} classes with {b} students in each class. {c} students are absent today. "
        f"The students who are present are split into teams of {d}. How many teams are there?"
    )
    steps = [
        f"The school has {a} * {b} = {total} students.",
        f"Today {total} - {c} = {present} students are present.",
        f"They make {present} / {d} = {present // d} teams.",
    ]
    return (a, b, c, d), q, steps, present // d


def _t_savings(rng: random.Random) -> Problem | None:
    ((name, sub, obj, poss),) = _people(rng, 1)
    a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(2, 60)
    x = a * b
    y = x + c
    if y % 2:
        return None
    half = y // 2
    q = (
        f"{name} saves ${a} every week for {b} weeks. Then {poss} grandmother gives {obj} ${c}. "
        f"{sub.capitalize()} spends half of all the money on a bike. How many dollars does {name} "
        "have left?"
    )
    steps = [
        f"{name} saves {a} * {b} = {x} dollars.",
        f"With the gift {sub} has {x} + {c} = {y} dollars.",
        f"The bike costs half of that: {y} / 2 = {half} dollars.",
        f"{sub.capitalize()} has {y} - {half} = {y - half} dollars left.",
    ]
    return (a, b, c), q, steps, y - half


def _t_three_people(rng: random.Random) -> Problem | None:
    (n1, *_), (n2, *_), (n3, *_) = _people(rng, 3)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 5)
    y = a * b
    c = rng.randint(1, y - 1)
    z = y - c
    s = a + y
    q = (
        f"{n1} has {a} {item}. {n2} has {b} times as many {item} as {n1}. {n3} has {c} fewer "
        f"{item} than {n2}. How many {item} do the three of them have together?"
    )
    steps = [
        f"{n2} has {b} * {a} = {y} {item}.",
        f"{n3} has {y} - {c} = {z} {item}.",
        f"{n1} and {n2} have {a} + {y} = {s} {item}.",
        f"Together the three have {s} + {z} = {s + z} {item}.",
    ]
    return (a, b, c), q, steps, s + z


def _t_orchard(rng: random.Random) -> Problem | None:
    a, b, c = rng.randint(2, 6), rng.randint(3, 10), rng.randint(2, 5)
    trees = a * b
    baskets = trees * c
    d = rng.randint(1, baskets - 2)
    e = rng.randint(1, baskets - d - 1)
    left = baskets - d - e
    q = (
        f"A farmer has {a} rows of apple trees with {b} trees in each row. Each tree gives {c} "
        f"baskets of apples. The farmer sells {d} baskets and gives {e} baskets to neighbors. How "
        "many baskets are left?"
    )
    steps = [
        f"The farmer has {a} * {b} = {trees} trees.",
        f"The trees give {trees} * {c} = {baskets} baskets.",
        f"After selling {d}, {baskets} - {d} = {baskets - d} baskets remain.",
        f"After giving {e} away, {baskets - d} - {e} = {left} baskets are left.",
    ]
    return (a, b, c, d, e), q, steps, left


TEMPLATES: tuple[Template, ...] = (
    _t_buy_give,
    _t_packs,
    _t_change,
    _t_share,
    _t_bakery,
    _t_wages,
    _t_reading,
    _t_shop,
    _t_teams,
    _t_savings,
    _t_three_people,
    _t_orchard,
)


def problem_split(template_index: int, numbers: tuple[int, ...]) -> str:
    """The split a problem identity belongs to: ``test`` when SHA-256(identity) is 0 mod 5.

    Args:
        template_index: index into :data:`TEMPLATES`.
        numbers: the problem's defining numbers.

    Returns:
        ``"train"`` or ``"test"``.
    """
    key = f"{template_index}:{','.join(map(str, numbers))}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


@functools.cache
def _generate(split: str) -> tuple[tuple[int, str, str], ...]:
    rng = random.Random(SPLIT_SEEDS[split])
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: list[tuple[int, str, str]] = []
    while len(out) < SPLIT_SIZES[split]:
        index = rng.randrange(len(TEMPLATES))
        problem = TEMPLATES[index](rng)
        if problem is None:
            continue
        numbers, question, steps, final = problem
        if (index, numbers) in seen or problem_split(index, numbers) != split:
            continue
        seen.add((index, numbers))
        out.append((index, question, "\n".join([*steps, f"#### {final}"])))
    return tuple(out)


def arith_problems(split: str) -> list[tuple[int, str, str]]:
    """The problems of one split of ``builtin:arith``.

    Args:
        split: ``"train"`` (5000 problems) or ``"test"`` (500).

    Returns:
        ``(template index, question, answer)`` tuples in generation order; ``answer`` ends with
        ``#### <integer>``.

    Raises:
        DataError: unknown split.
    """
    if split not in SPLIT_SIZES:
        raise DataError(
            f"builtin:arith has splits {sorted(SPLIT_SIZES)}, not {split!r}; "
            "use builtin:arith:train or builtin:arith:test"
        )
    return list(_generate(split))


def _file_rows(name: str, split: str) -> list[dict[str, str]]:
    """The rows of a file-backed built-in set (:data:`FILE_SETS`), checked against its digest."""
    file, only_split, digest = FILE_SETS[name]
    if split != only_split:
        raise DataError(
            f"builtin:{name} has only the split {only_split!r} (held-out data, never trained "
            f"on), not {split!r}; use builtin:{name}:{only_split}"
        )
    path = SETS_DIR / file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"builtin:{name}: cannot read {path}: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise DataError(
            f"builtin:{name}: {path} has SHA-256 {actual}, not the {digest} recorded in "
            "fastmid/data/builtin.py (FILE_SETS); record the new digest if the edit is intended"
        )
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def builtin_rows(name: str, split: str) -> list[dict[str, str]]:
    """Rows of a built-in data set, in GSM8K's ``question``/``answer`` columns.

    Args:
        name: the part after ``builtin:``: ``"arith"`` (generated) or ``"arith-unseen"`` (a
            file, :data:`FILE_SETS`).
        split: ``"train"`` or ``"test"`` (``arith-unseen`` has only ``"test"``).

    Returns:
        Fresh row dicts (callers may modify them).

    Raises:
        DataError: unknown name or split, or a set file that is missing or differs from its
            recorded SHA-256.
    """
    if name not in BUILTINS:
        raise DataError(
            f"builtin:{name} does not exist; built-in data sets: "
            + ", ".join(f"builtin:{b}" for b in BUILTINS)
        )
    if name in FILE_SETS:
        return _file_rows(name, split)
    return [{"question": q, "answer": a} for _, q, a in arith_problems(split)]
