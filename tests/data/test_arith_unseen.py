"""builtin:arith-unseen (fastmid/data/sets/arith_unseen.jsonl), the held-out set, row by row.

Every row is checked independently of how it was written: the arithmetic of each step, the number
of steps, where every operand comes from, the final line, and that no phrasing overlaps the
generator's questions (word 6-grams after numbers, names, items and pronouns are replaced by
placeholders, one differing word allowed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import fastmid.data
from fastmid.data import DataError, builtin, load_conversations, load_eval_problems
from fastmid.data.builtin import ITEMS, NAMES, arith_problems, builtin_rows

SET = Path(fastmid.data.__file__).parent / "sets" / "arith_unseen.jsonl"
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
# words a question may use for a step's operand instead of digits
NUMBER_WORDS = {"twice": 2, "double": 2, "half": 2, "triple": 3, "dozen": 12}
SPELLED = {
    w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
N = 6  # n-gram length of the phrasing check
PRONOUNS = {"he", "she", "him", "her", "his", "hers", "they", "them", "their"}
ITEM_WORDS = {*ITEMS, *(i[:-1] for i in ITEMS)}  # plural and singular
GENERATOR_NAMES = {n for n, *_ in NAMES}


def _rows() -> list[dict[str, str]]:
    lines = SET.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _builtin_questions() -> list[str]:
    return [q for split in ("train", "test") for _, q, _ in arith_problems(split)]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+|\d+", text)


def _normalizer(corpus: list[str]):
    """Tokens of a question with numbers, names, items and pronouns replaced by placeholders.

    A name is a generator name or a capitalized word that never occurs in lower case in
    ``corpus`` (so ``The`` is a word and ``Gwen`` a name wherever it stands)."""
    lower = {w for text in corpus for w in _words(text) if w.islower()}

    def tokens(text: str) -> list[str]:
        out = []
        for w in _words(text):
            low = w.lower()
            if w.isdigit() or low in NUMBER_WORDS or low in SPELLED:
                out.append("<num>")
            elif w in GENERATOR_NAMES or (w[0].isupper() and low not in lower):
                out.append("<name>")
            elif low in ITEM_WORDS:
                out.append("<item>")
            elif low in PRONOUNS:
                out.append("<pro>")
            else:
                out.append(low)
        return out

    return tokens


def _ngrams(tokens: list[str]) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + N]) for i in range(len(tokens) - N + 1)}


def _masked(gram: tuple[str, ...]) -> set[tuple[str, ...]]:
    """The n-gram with each one of its words replaced by a wildcard."""
    return {(*gram[:i], "*", *gram[i + 1 :]) for i in range(len(gram))}


@pytest.fixture(scope="module")
def overlap():
    """``overlap(question)``: the question's n-grams that match a builtin n-gram with at most
    one word different."""
    builtin = _builtin_questions()
    tokens = _normalizer(builtin + [r["question"] for r in _rows()])
    exact: set[tuple[str, ...]] = set()
    for question in builtin:
        exact |= _ngrams(tokens(question))
    masked = {m for gram in exact for m in _masked(gram)}

    def find(question: str) -> list[tuple[str, ...]]:
        return sorted(g for g in _ngrams(tokens(question)) if g in exact or _masked(g) & masked)

    return find


def test_rows_are_gsm8k_shaped_and_unique():
    rows = _rows()
    assert len(rows) >= 120
    assert all(set(r) == {"question", "answer"} for r in rows)
    questions = [r["question"] for r in rows]
    assert len(set(questions)) == len(questions)
    finals = [r["answer"].rsplit("#### ", 1)[1] for r in rows]
    assert len(set(finals)) >= len(rows) // 2, "final answers are too repetitive"


def _row_errors(question: str, answer: str) -> list[str]:
    """What is wrong with one row: not two steps, wrong arithmetic, an operand the question does
    not give, a value out of range, a wrong final line, a generator name or item."""
    lines = answer.split("\n")
    if len(lines) != 3 or answer.count("####") != 1:
        return ["the answer is not two step lines and a '#### n' line"]
    steps = [STEP.findall(line) for line in lines[:2]]
    if [len(s) for s in steps] != [1, 1] or STEP.search(question) or "=" in lines[2]:
        return ["not exactly one computation on each of the two step lines"]
    errors = []
    given = {int(w) for w in _words(question) if w.isdigit()}
    given |= {v for w, v in NUMBER_WORDS.items() if re.search(rf"\b{w}\b", question, re.I)}
    results: list[int] = []
    for ((a, op, b, c),) in steps:
        a, b, c = int(a), int(b), int(c)
        exact = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b and a % b == 0 else None}
        if exact[op] != c:
            errors.append(f"{a} {op} {b} = {c} is wrong")
        errors += [f"{x} comes from nowhere" for x in (a, b) if x not in given | set(results)]
        errors += [f"{x} is not in 1..999" for x in (a, b, c) if not 0 < x < 1000]
        results.append(c)
    ((a2, _, b2, _),) = steps[1]
    if results[0] not in (int(a2), int(b2)):
        errors.append("the second step does not use the first step's result")
    if lines[2] != f"#### {results[1]}":
        errors.append(f"final line {lines[2]!r} is not '#### {results[1]}'")
    words = {w.lower() for w in _words(question + " " + answer)}
    taken = words & ({n.lower() for n in GENERATOR_NAMES} | ITEM_WORDS)
    errors += [f"{w!r} is a name or item of the generator" for w in sorted(taken)]
    return errors


@pytest.mark.parametrize("index", range(len(_rows())))
def test_every_row_is_two_correct_steps(index):
    row = _rows()[index]
    assert _row_errors(row["question"], row["answer"]) == []


def test_the_row_check_can_fail():
    question = "Gwen has 3 bags with 12 plums in each. She eats 5. How many plums remain?"
    good = "She has 3 * 12 = 36 plums.\nShe has 36 - 5 = 31 plums left.\n#### 31"
    assert _row_errors(question, good) == []
    assert _row_errors(question, good.replace("36 - 5 = 31", "36 - 5 = 30")) != []
    assert _row_errors(question, good.replace("#### 31", "#### 36")) != []
    assert _row_errors(question, good.replace("36 - 5", "36 - 6").replace("31", "30")) != []
    assert _row_errors(question, good.replace("36 - 5 = 31", "12 - 5 = 7").replace("31", "7"))
    assert _row_errors(question, "She has 3 * 12 = 36 plums.\n#### 36") != []
    assert _row_errors(question.replace("plums", "marbles"), good) != []


def test_no_phrasing_overlaps_the_generator(overlap):
    found = {r["question"]: g for r in _rows() if (g := overlap(r["question"]))}
    assert not found, found


def test_the_overlap_check_can_fail(overlap):
    _, question, _ = arith_problems("test")[0]
    assert overlap(question)
    # the same template with new names, items and numbers still overlaps
    reworded = "Gwen has 12 plums. She buys 5 more and then gives 3 to Felix."
    assert overlap(reworded)
    assert overlap("Rosa buys 4 crates of marbles with 9 marbles in each crate.")  # one word off


@pytest.mark.parametrize("data", [str(SET), "builtin:arith-unseen", "builtin:arith-unseen:test"])
def test_loads_as_exact_match_data(data):
    problems = load_eval_problems(data, flag="--eval-accuracy-data")
    rows = _rows()
    assert len(problems) == len(rows)
    for (messages, answer), row in zip(problems, rows, strict=True):
        assert messages == [{"role": "user", "content": row["question"]}]
        assert answer == row["answer"].rsplit("#### ", 1)[1]


def test_the_named_set_is_pinned_and_has_no_train_split(monkeypatch):
    with pytest.raises(DataError, match="has only the split 'test'"):
        load_conversations("builtin:arith-unseen")  # training's default split is train
    file, split, _ = builtin.FILE_SETS["arith-unseen"]
    monkeypatch.setitem(builtin.FILE_SETS, "arith-unseen", (file, split, "0" * 64))
    with pytest.raises(DataError, match="SHA-256"):
        builtin_rows("arith-unseen", "test")
