"""Guard against training on evaluation questions.

Questions are compared after `normalize_question`: lowercase, every run of non-alphanumeric characters (punctuation,
underscores, whitespace) becomes one space. Dropping *all* punctuation, not only at the edges, is what it takes: the
AddSub, SingleEq and MAWPS copies inside ``math_data.json`` are re-tokenised ("drawer . Mary" vs "drawer. Mary").
With it, the counts of data/README.md are reproduced exactly (math_data.json: AQuA 203, AddSub 330, MultiArith 491,
SVAMP 800, SingleEq 425, GSM8K 1055, MAWPS 131; MAWPS train: AddSub 327, MultiArith 452, SingleEq 416, MAWPS 28);
lowercasing and collapsing whitespace alone finds only 316 / 406 / 54 of AddSub / SingleEq / MAWPS.
"""

import functools
import logging
import re

from s2ft.data.records import Example
from s2ft.errors import UserError

log = logging.getLogger(__name__)
_NON_ALPHANUMERIC = re.compile(r"[\W_]+")


class DataOverlapError(UserError, ValueError):
    """The training set contains questions of an evaluation set."""


# Loading a commonsense source cleans it against the same 12k test questions; caching spares re-normalising them.
@functools.lru_cache(maxsize=1 << 16)
def normalize_question(text: str) -> str:
    """Lowercases and reduces every run of non-alphanumeric characters to one space (Unicode letters are kept)."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).strip()


def _question(example: Example) -> str:
    # The question is the instruction (GSM8K readers put the question there too); inputs are empty in every set here.
    return normalize_question(f"{example.instruction} {example.input}")


def find_overlaps(train: list[Example], eval_sets: dict[str, list[Example]]) -> dict[str, int]:
    """Counts, per evaluation set, the items whose normalised question also occurs in the training set."""
    seen = {_question(ex) for ex in train}
    return {name: sum(_question(ex) in seen for ex in examples) for name, examples in eval_sets.items()}


def drop_overlaps(train: list[Example], eval_sets: dict[str, list[Example]]) -> tuple[list[Example], dict[str, int]]:
    """Removes the training items whose normalised question occurs in any evaluation set.

    Returns:
        (clean training items in their order, overlap counts per evaluation set before the removal).
    """
    train_questions = [_question(ex) for ex in train]
    seen = set(train_questions)
    eval_questions = {name: [_question(ex) for ex in examples] for name, examples in eval_sets.items()}
    counts = {name: sum(question in seen for question in questions) for name, questions in eval_questions.items()}
    held = set().union(*eval_questions.values())
    return [ex for ex, question in zip(train, train_questions, strict=True) if question not in held], counts


def check_overlap(train: list[Example], eval_sets: dict[str, list[Example]], allow: bool = False) -> dict[str, int]:
    """Refuses a training set that contains evaluation questions, unless the user opted in.

    Args:
        train: The training items.
        eval_sets: Evaluation set name -> its items.
        allow: Opt-in (``data.allow_overlap=true``): the counts are logged as a warning instead of raising.

    Returns:
        Overlap count per evaluation set (for the run's log).

    Raises:
        DataOverlapError: Some evaluation set shares questions with the training set and ``allow`` is false; the
            message gives the count per set and the two ways out.
    """
    counts = find_overlaps(train, eval_sets)
    overlapping = {name: count for name, count in counts.items() if count}
    if not overlapping:
        return counts
    listing = ", ".join(f"{name} {count}/{len(eval_sets[name])}" for name, count in overlapping.items())
    if allow:
        log.warning("training set shares questions with evaluation sets (allowed by data.allow_overlap): %s", listing)
        return counts
    raise DataOverlapError(
        f"the training set contains questions of the evaluation sets ({listing}); accuracy on them would measure "
        "memorisation. Train on a clean set (GSM8K train has no overlap) or opt in with data.allow_overlap=true"
    )
