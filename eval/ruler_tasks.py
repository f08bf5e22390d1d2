"""RULER-style synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"; NVIDIA/RULER scripts/data/synthetic/{niah,variable_tracking,
common_words_extraction,constants}.py), generated offline for any tokenizer, in tokens.

A ``Prompt`` is a shared context (instruction + haystack) and one or more ``Question`` s asked against
it: each question's tokens (question + RULER's answer prefix) follow the context directly, and its
expected answer's tokens are what the model generates. For a target length L, every
context + question + answer fits in L tokens and the longest is exactly L tokens (one-question tasks:
exactly L). Tasks:

* ``niah_multikey``: "One of the special magic numbers for {key} is: {value}." needles (7-digit
  values, word keys) in RULER's noise haystack, one needle at each depth of ``depths``; every needle
  is a question ("... for {key}?"), the others are its distractors. Depth d puts the needle after
  round(d * F) haystack tokens, F = the haystack's length.
* ``niah_multivalue``: ``MV_KEYS`` keys with ``MV_VALUES`` values each, needles at random depths;
  each key is a question whose answer is all its values.
* ``variable_tracking``: one chain "VAR A = 12345", "VAR B = VAR A", ... (``VT_HOPS`` hops) in
  order at random depths of the noise; asks for every variable assigned the value.
* ``common_words``: a numbered word list, ``CW_COMMON`` words repeated often and the rest rarely
  (RULER's 30 / 3 times from 4096 tokens, 6 / 1 below; 6 / 1 also where 30 repeats would take more
  than half the list, as with a byte tokenizer at 4096); asks for the most common words. Its list fills the
  length as closely as whole entries allow; the remaining tokens are noise before the instruction.

Scoring is RULER's string_match_all: the fraction of expected strings found (case-insensitive) in the
generated text. Everything is drawn from ``random.Random(f"{seed}:{task}:{length}:{trial}")``.
RULER's few-shot examples (variable tracking, common words at short lengths) are not included.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .tokens import encode

TASKS = ("niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NIAH_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.\n")
NEEDLE = " One of the special magic numbers for {key} is: {value}. "
NIAH_QUESTION = {  # RULER's template and answer prefix, in the singular for one value
    False: "\nWhat is the special magic number for {key} mentioned in the provided text? The special magic number for {key} "
           "mentioned in the provided text is",
    True: "\nWhat are all the special magic numbers for {key} mentioned in the provided text? The special magic numbers for "
          "{key} mentioned in the provided text are"}
VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
               "According to the chain(s) of variable assignment in the text above, {n} variables are assigned the "
               "value {value}, they are:")
CW_HEADER = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
CW_QUESTION = ("\nQuestion: What are the {n} most common words in the above list? Answer: The top {n} words that "
               "appear most often in the list are:")
MV_KEYS, MV_VALUES, VT_HOPS, CW_COMMON = 2, 4, 4, 10
CW_SYLLABLES = 4  # 70^4 = 24M words: rare words never run out; common and rare words look alike
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass(frozen=True)
class Question:
    ids: torch.Tensor            # question + answer prefix, right after the context
    answer: torch.Tensor         # the expected answer's tokens: what the model generates
    expected: tuple[str, ...]    # the strings scored
    depth: float | None


@dataclass(frozen=True)
class Prompt:
    context: torch.Tensor
    questions: tuple[Question, ...]

    def length(self, question: Question) -> int:
        return self.context.numel() + question.ids.numel() + question.answer.numel()


def check_task(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"unknown RULER task {name!r}; choose from {', '.join(TASKS)}")
    return name


def questions_per_prompt(task: str, depths: Sequence[float]) -> int:
    """Questions one prompt of ``task`` asks: one per depth (multi-key), per key (multi-value), else 1."""
    return {"niah_multikey": len(depths), "niah_multivalue": MV_KEYS}.get(check_task(task), 1)


def string_match_all(prediction: str, expected: Sequence[str]) -> float:
    """RULER's string_match_all for one prediction: the fraction of ``expected`` found in it, case-insensitive."""
    low = prediction.lower()
    return sum(e.lower() in low for e in expected) / len(expected)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))


def _distinct(rng: random.Random, n: int, make) -> list[str]:
    out: dict[str, None] = {}
    while len(out) < n:
        out[make()] = None
    return list(out)


def _noise(tokenizer: Any, n: int) -> torch.Tensor:
    """The first ``n`` tokens of RULER's noise haystack (its sentences repeated)."""
    unit = encode(tokenizer, NOISE)
    return unit.repeat(n // unit.numel() + 1)[:n]


def _fill(filler: torch.Tensor, pieces: list[torch.Tensor], depths: list[float]) -> torch.Tensor:
    """``filler`` with each piece inserted after round(depth * len(filler)) of its tokens (ties in order)."""
    order = sorted(range(len(pieces)), key=lambda i: (round(depths[i] * filler.numel()), i))
    parts, cut = [], 0
    for i in order:
        at = round(depths[i] * filler.numel())
        parts += [filler[cut:at], pieces[i]]
        cut = at
    return torch.cat(parts + [filler[cut:]])


def _budget(length: int, task: str, fixed: int) -> int:
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"RULER length {length} is too short for {task}: its instruction, needles, question and answer "
                         f"alone take {fixed} tokens")
    return budget


def _haystack_prompt(tokenizer: Any, task: str, length: int, header: str, needles: list[str], depths: list[float],
                     questions: list[tuple[str, str, tuple[str, ...], float | None]]) -> Prompt:
    """Header + noise with ``needles`` at ``depths`` + each (question, answer, expected, depth)."""
    head = encode(tokenizer, header)
    pieces = [encode(tokenizer, n) for n in needles]
    asked = [Question(encode(tokenizer, q), encode(tokenizer, a), exp, d) for q, a, exp, d in questions]
    longest = max(q.ids.numel() + q.answer.numel() for q in asked)
    budget = _budget(length, task, head.numel() + sum(p.numel() for p in pieces) + longest)
    return Prompt(torch.cat([head, _fill(_noise(tokenizer, budget), pieces, depths)]), tuple(asked))


def niah(tokenizer: Any, task: str, length: int, rng: random.Random, depths: Sequence[float], asked: int) -> Prompt:
    """A multi-key (one needle per depth) or multi-value (``MV_KEYS`` x ``MV_VALUES`` needles at
    random depths) haystack; the first ``asked`` keys are questions."""
    multi = task == "niah_multivalue"
    n_keys = MV_KEYS if multi else len(depths)
    keys = _distinct(rng, n_keys, lambda: f"{_word(rng, 2)}-{_word(rng, 3)}")
    values = [[str(rng.randint(10 ** 6, 10 ** 7 - 1)) for _ in range(MV_VALUES if multi else 1)] for _ in keys]
    needles = [(k, v) for k, vs in zip(keys, values) for v in vs]
    placed = [rng.random() for _ in needles] if multi else [float(d) for d in depths]
    questions = [(NIAH_QUESTION[multi].format(key=keys[i]), " " + ", ".join(values[i]) + ".", tuple(values[i]),
                  None if multi else placed[i]) for i in range(asked)]
    return _haystack_prompt(tokenizer, task, length, NIAH_HEADER, [NEEDLE.format(key=k, value=v) for k, v in needles],
                            placed, questions)


def variable_tracking(tokenizer: Any, length: int, rng: random.Random) -> Prompt:
    """One chain of ``VT_HOPS`` hops, its lines in order at random depths of the noise."""
    names = _distinct(rng, VT_HOPS + 1, lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    value = str(rng.randint(10000, 99999))
    lines = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in lines)
    question = (VT_QUESTION.format(value=value, n=len(names)), " " + " ".join(names), tuple(names), None)
    return _haystack_prompt(tokenizer, "variable_tracking", length, VT_HEADER, lines, depths, [question])


def common_words(tokenizer: Any, length: int, rng: random.Random) -> Prompt:
    """A numbered list: ``CW_COMMON`` words repeated often, as many rare words as whole entries fit."""
    question = encode(tokenizer, CW_QUESTION.format(n=CW_COMMON))
    head = encode(tokenizer, CW_HEADER)
    common = _distinct(rng, CW_COMMON, lambda: _word(rng, CW_SYLLABLES))
    answer = encode(tokenizer, "".join(f" {i + 1}. {w}" for i, w in enumerate(common)))
    budget = _budget(length, "common_words", head.numel() + question.numel() + answer.numel())
    cost = {w: encode(tokenizer, f" {w}").numel() for w in common}
    numbers = [0]  # numbers[n]: tokens of the entry numbers " 1." ... " n."

    def number_cost(n: int) -> int:
        while len(numbers) <= n:
            numbers.append(numbers[-1] + encode(tokenizer, f" {len(numbers)}.").numel())
        return numbers[n]

    frequent, rare = 30, 3
    used = number_cost(frequent * CW_COMMON) + frequent * sum(cost.values())
    if length < 4096 or 2 * used > budget:
        frequent, rare = 6, 1
        used = number_cost(frequent * CW_COMMON) + frequent * sum(cost.values())
    words = [w for w in common for _ in range(frequent)]
    if used > budget:
        raise ValueError(f"RULER length {length} is too short for common_words: its instruction, question, answer and "
                         f"{len(words)} entries of the common words alone take {length - budget + used} tokens")
    seen = set(common)
    while True:
        word = _word(rng, CW_SYLLABLES)
        if word in seen:
            continue
        extra = encode(tokenizer, f" {word}").numel() * rare + number_cost(len(words) + rare) - number_cost(len(words))
        if used + extra > budget:
            break
        seen.add(word)
        words += [word] * rare
        used += extra
    rng.shuffle(words)
    listing = torch.cat([piece for i, w in enumerate(words) for piece in (encode(tokenizer, f" {i + 1}."), encode(tokenizer, f" {w}"))])
    context = torch.cat([_noise(tokenizer, budget - used), head, listing])
    return Prompt(context, (Question(question, answer, tuple(common), None),))


def build(tokenizer: Any, task: str, length: int, seed: int, trial: int, depths: Sequence[float] = DEPTHS,
          asked: int | None = None) -> Prompt:
    """Prompt ``trial`` of ``task`` at ``length`` tokens; ``asked``: how many of its questions (all by default)."""
    per = questions_per_prompt(task, depths)
    asked = per if asked is None else asked
    if not 1 <= asked <= per:
        raise ValueError(f"asked must be in [1, {per}] for {task}, got {asked!r}")
    rng = random.Random(f"{seed}:{task}:{length}:{trial}")
    if task.startswith("niah"):
        return niah(tokenizer, task, length, rng, depths, asked)
    if task == "variable_tracking":
        return variable_tracking(tokenizer, length, rng)
    return common_words(tokenizer, length, rng)
