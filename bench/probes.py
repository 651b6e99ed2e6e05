"""Quality probes for `quire bench runtime`: pass-key retrieval in filler text, and
five reading-comprehension questions on a short passage written for Quire.

Pass-key retrieval follows the probe of Mohtashami & Jaggi 2023 ("Landmark
Attention"): a five-digit key hidden in repeated filler, asked for at the end.
"""

from __future__ import annotations

import random
import re

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)

# An original passage (written for this benchmark) with facts that are easy to check.
PASSAGE = """\
Marta Ilves kept the lighthouse on Skarvholm for nineteen years. The island lies
eleven kilometres north of the harbour town of Veldby, and in winter the supply boat
came only on Thursdays. Marta arrived in 1961, two years after the old keeper, Johan
Brekke, retired to a farm near the town of Lund. Her first winter was the hardest:
a storm in February broke the lantern's glass, and she kept a paraffin lamp burning
in the gallery for six nights until the boat could bring a new pane.

She kept a logbook in green ink. In it she recorded ships, weather and birds; the
entry she was proudest of notes three hundred and twelve eider ducks counted on a
single morning in April 1967. Her brother Anders, a clockmaker, built the brass
timing mechanism that turned the lens, and it ran without a fault until the light
was automated in 1980, the year Marta left the island and moved to Veldby to teach
navigation at the maritime school.
"""

QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("How many years did Marta Ilves keep the lighthouse?", ("nineteen", "19")),
    ("What colour of ink did Marta use in her logbook?", ("green",)),
    ("Who built the brass timing mechanism that turned the lens?", ("anders",)),
    ("On which day of the week did the supply boat come in winter?", ("thursday",)),
    ("In what year was the light automated?", ("1980",)),
]


def reading_messages(question: str) -> list[dict]:
    prompt = (
        "Read the passage and answer the question in a few words.\n\n"
        f"Passage:\n{PASSAGE}\nQuestion: {question}"
    )
    return [{"role": "user", "content": prompt}]


def reading_completion(question: str) -> str:
    """The same probe as a plain completion, for base models without a chat format."""
    return f"{PASSAGE}\nQuestion: {question}\nAnswer (a few words):"


def answer_is_correct(answer: str, accepted: tuple[str, ...]) -> bool:
    """True when a whole word of the answer is an accepted one ("19" must not match
    "1961"; "thursday" matches "Thursdays")."""
    lowered = answer.lower()
    return any(re.search(rf"\b{re.escape(word)}(s)?\b", lowered) for word in accepted)


def rescore(question: str, answer: str) -> bool:
    """Score a stored answer with today's rules (reports re-score old JSON)."""
    for known, accepted in QUESTIONS:
        if known == question:
            return answer_is_correct(answer, accepted)
    raise KeyError(question)


def passkey_prompt(count_tokens, target_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """(prompt text, key): filler around a key placed at `depth` (0..1), about
    `target_tokens` long as measured by `count_tokens(text) -> int`."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    intro = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    per_filler = max(1, count_tokens(FILLER))
    budget = target_tokens - count_tokens(intro + needle + question)
    repeats = max(1, budget // per_filler)
    before = int(repeats * depth)
    text = intro + FILLER * before + needle + FILLER * (repeats - before) + question
    return text, key
