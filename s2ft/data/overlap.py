"""Guard against training on evaluation questions.

Questions are compared after `normalize_question`: NFKC, lowercase, every run of non-alphanumeric characters
(punctuation, underscores, whitespace) becomes one space. Dropping *all* punctuation, not only at the edges, is what it
takes: the AddSub, SingleEq and MAWPS copies inside ``math_data.json`` are re-tokenised ("drawer . Mary" vs "drawer.
Mary").
With it, the counts of data/README.md are reproduced exactly (math_data.json: AQuA 203, AddSub 330, MultiArith 491,
SVAMP 800, SingleEq 425, GSM8K 1055, MAWPS 131; MAWPS train: AddSub 327, MultiArith 452, SingleEq 416, MAWPS 28);
lowercasing and collapsing whitespace alone finds only 316 / 406 / 54 of AddSub / SingleEq / MAWPS.
"""

import functools
import itertools
import logging
import re
import unicodedata

from s2ft.data.records import Example
from s2ft.errors import UserError

log = logging.getLogger(__name__)
_NON_ALPHANUMERIC = re.compile(r"[\W_]+")
# A chat record's system message, as `s2ft.data.user` writes it at the head of the input: to the next turn's line.
_LEADING_SYSTEM = re.compile(r"\Asystem: .*?(?:\n(?=(?:user|assistant): )|\Z)", re.DOTALL)
SHOWN = 5  # shared items the guard's messages name


class DataOverlapError(UserError, ValueError):
    """The training set contains questions of an evaluation or held-out set."""


# Loading a commonsense source cleans it against the same 12k test questions; caching spares re-normalising them.
@functools.lru_cache(maxsize=1 << 16)
def normalize_question(text: str) -> str:
    """Lowercases and reduces every run of non-alphanumeric characters to one space (Unicode letters are kept).

    The text is NFKC-normalised first: an accent written as its own combining character (NFD, as some tools and
    macOS write it) is no letter of its own, so "café" so written would read "cafe" and miss the same question
    written with the composed "é"; full-width letters and digits and ligatures ("ﬁ") are their plain forms.
    """
    return _NON_ALPHANUMERIC.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def _question(example: Example) -> str:
    # The question is the instruction plus its input (GSM8K readers put the question in the instruction). A chat
    # record's earlier turns are its input (`s2ft.data.user`), led by its system message: that message sets a
    # persona or a format, not what is asked, so it is left out and the same question with and without one (or
    # under another) is one item. The later turns stay: "And the second one?" asks something else in each dialogue.
    return normalize_question(f"{example.instruction} {_LEADING_SYSTEM.sub('', example.input)}")


def _shared(train: list[Example], eval_sets: dict[str, list[Example]]) -> dict[str, list[tuple[str, str]]]:
    """Per evaluation set, (its item's id, the id of the first training item asking the same) for each shared item."""
    first: dict[str, str] = {}
    for example in train:
        first.setdefault(_question(example), example.id)
    return {
        name: [(ex.id, first[question]) for ex in examples if (question := _question(ex)) in first]
        for name, examples in eval_sets.items()
    }


def find_overlaps(train: list[Example], eval_sets: dict[str, list[Example]]) -> dict[str, int]:
    """Counts, per evaluation set, the items whose normalised question also occurs in the training set."""
    return {name: len(pairs) for name, pairs in _shared(train, eval_sets).items()}


def _describe(train: list[Example], eval_sets: dict[str, list[Example]]) -> tuple[dict[str, int], str]:
    # The counts, and the sets that share items with a few of those items, taken from each set in turn: "multiarith
    # 491/600, gsm8k 1052/1319; e.g. multiarith-0 = training math_data-5, gsm8k-3 = training math_data-17, ...". The ids
    # are those of the predictions files and of the training records (a user's file: its record index).
    shared = _shared(train, eval_sets)
    counts = {name: len(pairs) for name, pairs in shared.items()}
    listing = ", ".join(f"{name} {count}/{len(eval_sets[name])}" for name, count in counts.items() if count)
    if not listing:
        return counts, ""
    pairs = [pair for turn in itertools.zip_longest(*shared.values()) for pair in turn if pair]
    shown = ", ".join(f"{item} = training {source}" for item, source in pairs[:SHOWN])
    return counts, f"{listing}; e.g. {shown}{', ...' if len(pairs) > SHOWN else ''}"


def overlap_findings(
    train: list[Example], eval_sets: dict[str, list[Example]], heldout: dict[str, list[Example]]
) -> tuple[dict[str, int], str]:
    """What the guard reports: the overlap counts (held-out sets under ``"heldout:NAME"``) and the sentence part that
    names the sets sharing items, with a few of the items and what the overlap would spoil (empty when none)."""
    counts, listing = _describe(train, eval_sets)
    heldout_counts, heldout_listing = _describe(train, heldout)
    counts |= {f"heldout:{name}": count for name, count in heldout_counts.items()}
    parts = (
        listing and f"the evaluation sets ({listing}), whose accuracy would measure memorisation",
        heldout_listing and f"the held-out sets ({heldout_listing}), whose loss would be a training loss",
    )
    return counts, "; ".join(part for part in parts if part)


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


def check_overlap(
    train: list[Example],
    eval_sets: dict[str, list[Example]],
    allow: bool = False,
    heldout: dict[str, list[Example]] | None = None,
) -> dict[str, int]:
    """Refuses a training set that contains evaluation or held-out questions, unless the user opted in.

    Args:
        train: The training items.
        eval_sets: Evaluation set name -> its items.
        allow: Opt-in (``data.allow_overlap=true``): the counts are logged as a warning instead of raising.
        heldout: Held-out loss set name (``eval.heldout``) -> its items: a loss on training items is no held-out
            loss, so they are checked as the evaluation sets are.

    Returns:
        Overlap count per evaluation set, and per held-out set under ``"heldout:NAME"`` (for the run's log).

    Raises:
        DataOverlapError: Some set shares questions with the training set and ``allow`` is false; the message names
            each such set with its count and a few shared items, and the ways out.
    """
    counts, found = overlap_findings(train, eval_sets, heldout or {})
    if not found:
        return counts
    if allow:
        log.warning("the training set shares questions with %s (allowed by data.allow_overlap)", found)
        return counts
    raise DataOverlapError(
        f"the training set contains questions of {found}. Remove those items from the training data, check other sets "
        "(eval.tasks or data.overlap_tasks, eval.heldout), or opt in with data.allow_overlap=true"
    )
