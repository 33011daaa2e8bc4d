"""MT-Bench-style instruction evaluation (paper Table 3): two-turn answers, single-answer grading by a judge, 1-10.

The protocol of MT-Bench (Zheng et al. 2023, FastChat's ``llm_judge``): every question has two user turns; the model
answers the first, then the second with its own first answer in the conversation; a judge rates each turn from 1 to
10 with the single-answer grading prompts (turn 2 through the multi-turn prompt, which shows the whole conversation
and asks about the second answer); math, reasoning and coding are graded against a reference answer. The score is
the mean over all rated turns, also given per turn and per category.

Differences from FastChat, on purpose:
- Answers are greedy (reproducible); FastChat samples at a per-category temperature (0.7 writing / roleplay, 0.1
  stem / humanities, 0 otherwise).
- The conversation uses the prompt template the model was fine-tuned with (``data.template``, default the
  project's Alpaca prompt; Alpaca-GPT4 is single-turn): the second turn appends the first answer and a new
  "### Instruction:" block, or continues the tokenizer's chat template.
- A judgment without a rating, or with one outside 1-10, is recorded as missing (``rating_error`` per turn,
  ``missing_ratings`` in the summary) and left out of the means, as FastChat leaves out its -1.

The shipped question set (``data/mtbench_style/question.jsonl``) is this project's own 16 questions in MT-Bench's
format, two per category; it is NOT the official 80 questions, so its scores are not MT-Bench scores. Point
``eval.mtbench.questions`` at FastChat's ``question.jsonl`` (and ``references`` at ``reference_answer/gpt-4.jsonl``)
for the real benchmark.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from s2ft.data.prompt import build_prompt
from s2ft.errors import UserError
from s2ft.evaluation.evaluate import write_predictions
from s2ft.evaluation.generate import generate
from s2ft.evaluation.judge import Judge, JudgeRequest, build_judge, chat_prompt, judge_config_problems, parse_rating

QUESTIONS_FILE = Path("mtbench_style") / "question.jsonl"  # under paths.data_dir
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
NEED_REFERENCE = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS
DEFAULT_MAX_NEW_TOKENS = 1024  # FastChat's answer budget
MTBENCH_KEYS = ("questions", "references", "judge")
SECOND_TURN = "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
log = logging.getLogger(__name__)

# The single-answer grading prompts of FastChat's judge_prompts.jsonl (Apache-2.0), name -> (system, template).
_GENERAL = (
    "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and "
    "level of detail of the response."
)
_MATH = (
    "Your evaluation should consider correctness and helpfulness. You will be given a reference answer and the "
    "assistant's answer."
)
_RATE = (
    "Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 "
    'by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".'
)
_IMPARTIAL = "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant"
_CONVERSATION = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
    "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
    "<|The End of Assistant A's Conversation with User|>"
)
JUDGE_PROMPTS = {
    "single-v1": (
        "You are a helpful assistant.",
        f"[Instruction]\n{_IMPARTIAL} to the user question displayed below. {_GENERAL} Begin your evaluation by "
        f"providing a short explanation. {_RATE}\n\n[Question]\n{{question}}\n\n[The Start of Assistant's Answer]\n"
        "{answer}\n[The End of Assistant's Answer]",
    ),
    "single-math-v1": (
        "You are a helpful assistant.",
        f"[Instruction]\n{_IMPARTIAL} to the user question displayed below. {_MATH} Begin your evaluation by comparing "
        "the assistant's answer with the reference answer. Identify and correct any mistakes. "
        f"{_RATE}\n\n[Question]\n{{question}}\n\n[The Start of Reference Answer]\n{{ref_answer_1}}\n"
        "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
    ),
    "single-v1-multi-turn": (
        f"{_IMPARTIAL} to the user question displayed below. {_GENERAL} You evaluation should focus on the "
        f"assistant's answer to the second user question. Begin your evaluation by providing a short explanation. "
        f"{_RATE}\n\n",
        _CONVERSATION,
    ),
    "single-math-v1-multi-turn": (
        f"{_IMPARTIAL} to the user question. {_MATH} You evaluation should focus on the assistant's answer to the "
        "second question. Begin your evaluation by comparing the assistant's answer with the reference answer. "
        f"Identify and correct any mistakes. {_RATE}\n\n",
        "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
        "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n"
        + _CONVERSATION,
    ),
}


class MTBenchError(UserError):
    """Bad MT-Bench input: a missing or malformed question or reference file, or a bad ``eval.mtbench`` block."""


@dataclass(frozen=True)
class Question:
    """One MT-Bench question.

    Attributes:
        question_id: Its id in the file (an int in MT-Bench).
        category: One of `CATEGORIES` in MT-Bench; any name is accepted.
        turns: The two user turns.
        reference: The two reference answers (used for `NEED_REFERENCE` categories), or None.
    """

    question_id: int | str
    category: str
    turns: tuple[str, str]
    reference: tuple[str, str] | None = None


def load_questions(path: str | Path, references: str | Path | None = None) -> list[Question]:
    """Reads a question file in MT-Bench's format: one ``{"question_id", "category", "turns": [q1, q2]}`` per line.

    A question's optional ``"reference": [r1, r2]`` (both non-empty) is its reference answer; a ``references`` file
    (FastChat's answer format, ``{"question_id", "choices": [{"turns": [r1, r2]}]}`` per line, e.g.
    ``reference_answer/gpt-4.jsonl``) overrides it, as FastChat grades against GPT-4's answers.

    Raises:
        MTBenchError: A missing file, a line that is not JSON, a record without the fields above, two turns that
            are not non-empty strings, a duplicated id, an empty file (file and line in the message).
    """
    questions, seen = [], set()
    for line_no, record in _jsonl(path, "question"):
        where = f"{path}:{line_no}"
        if not isinstance(record, dict) or not {"question_id", "category", "turns"} <= record.keys():
            raise MTBenchError(f"{where}: a question needs question_id, category and turns, got {_short(record)}")
        turns = record["turns"]
        if not _two_texts(turns, allow_empty=False):
            raise MTBenchError(f"{where}: turns must be a list of two non-empty strings, got {_short(turns)}")
        qid = record["question_id"]
        if qid in seen:
            raise MTBenchError(f"{where}: question_id {qid!r} appears twice")
        seen.add(qid)
        reference = record.get("reference")
        usable = _two_texts(reference, allow_empty=False)
        questions.append(Question(qid, str(record["category"]), tuple(turns), tuple(reference) if usable else None))
    if not questions:
        raise MTBenchError(f"{path} holds no questions")
    if references is not None:
        answers = load_references(references)
        questions = [replace(q, reference=answers.get(q.question_id, q.reference)) for q in questions]
    return questions


def load_references(path: str | Path) -> dict[int | str, tuple[str, str]]:
    """Reference answers by question id from a file in FastChat's answer format.

    Raises:
        MTBenchError: A missing file, a line that is not JSON, or a record without two answer turns.
    """
    answers = {}
    for line_no, record in _jsonl(path, "reference answer"):
        try:
            qid, turns = record["question_id"], record["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise MTBenchError(
                f"{path}:{line_no}: a reference answer needs question_id and choices[0].turns, got {_short(record)}"
            ) from None
        if not _two_texts(turns, allow_empty=True):
            raise MTBenchError(f"{path}:{line_no}: choices[0].turns must be two strings, got {_short(turns)}")
        answers[qid] = tuple(turns)
    return answers


def select_questions(questions: list[Question], limit: int | None, seed: int = 0) -> list[Question]:
    """A deterministic subset of ``limit`` questions in file order (all of them when limit is None or too large)."""
    if limit is None or limit >= len(questions):
        return list(questions)
    chosen = sorted(random.Random(f"mtbench-{seed}").sample(range(len(questions)), limit))
    return [questions[i] for i in chosen]


def conversation_prompt(turns: list[str], answers: list[str], template: str = "alpaca", tokenizer=None) -> str:
    """The prompt that asks for the answer to ``turns[len(answers)]``, the earlier turns answered by ``answers``.

    ``alpaca``: the project's prompt for the first turn, then each answer followed by a new "### Instruction:"
    block. ``chat``: the tokenizer's chat template over the user and assistant messages, with its generation prompt
    (the form of ``data.template=chat``).
    """
    if template == "alpaca":
        prompt = build_prompt(turns[0])
        for answer, turn in zip(answers, turns[1:], strict=False):
            prompt += answer + SECOND_TURN.format(instruction=turn.strip())
        return prompt
    if template != "chat":
        raise MTBenchError(f"unknown prompt template {template!r} for MT-Bench answers; use alpaca or chat")
    if tokenizer is None or not tokenizer.chat_template:
        raise MTBenchError("MT-Bench answers with the chat template need a tokenizer that has one; use alpaca")
    messages = []
    for turn, answer in zip(turns, [*answers, None], strict=False):
        messages.append({"role": "user", "content": turn.strip()})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return chat_prompt(tokenizer, messages)


def answer_questions(
    model,
    tokenizer,
    questions: list[Question],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    template: str = "alpaca",
) -> list[tuple[str, str]]:
    """The model's greedy answers to both turns of every question (turn 2 sees the question and its own answer 1).

    Args:
        template: The prompt template the model was trained with (`conversation_prompt`).

    Returns:
        ``(answer_1, answer_2)`` per question, stripped, in order.
    """
    model.eval()
    kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    prompts = [conversation_prompt(list(q.turns), [], template, tokenizer) for q in questions]
    first = [g.text.strip() for g in generate(model, tokenizer, prompts, **kwargs)]
    prompts = [
        conversation_prompt(list(q.turns), [a], template, tokenizer) for q, a in zip(questions, first, strict=True)
    ]
    second = [g.text.strip() for g in generate(model, tokenizer, prompts, **kwargs)]
    return list(zip(first, second, strict=True))


def judge_requests(question: Question, answers: tuple[str, str]) -> list[tuple[str, JudgeRequest]]:
    """The two grading requests of one answered question, each with its FastChat prompt name.

    `NEED_REFERENCE` categories use the reference-answer prompts when the question has a reference, the general
    ones otherwise (the prompt name records which).
    """
    with_reference = question.category in NEED_REFERENCE and question.reference is not None
    fields = {
        "question": question.turns[0],
        "answer": answers[0],
        "question_1": question.turns[0],
        "question_2": question.turns[1],
        "answer_1": answers[0],
        "answer_2": answers[1],
    }
    if with_reference:
        fields |= {"ref_answer_1": question.reference[0], "ref_answer_2": question.reference[1]}
    names = ("single-math-v1", "single-math-v1-multi-turn") if with_reference else ("single-v1", "single-v1-multi-turn")
    requests = []
    for name in names:
        system, template = JUDGE_PROMPTS[name]
        requests.append((name, JudgeRequest(system, template.format(**fields))))
    return requests


def grade(questions: list[Question], answers: list[tuple[str, str]], judge: Judge) -> list[dict]:
    """Judges both turns of every answered question.

    Returns:
        One record per question (the lines of ``predictions/mtbench.jsonl``): question_id, category, turns, answers,
        judge (its name), judge_prompts, judgments, ratings (None where missing) and rating_errors (why missing).
    """
    requests = [judge_requests(q, a) for q, a in zip(questions, answers, strict=True)]
    judgments = judge.judge([request for pair in requests for _, request in pair])
    if len(judgments) != 2 * len(questions):
        raise RuntimeError(f"judge {judge.name} returned {len(judgments)} judgments for {2 * len(questions)} requests")
    records = []
    for i, (question, answer, pair) in enumerate(zip(questions, answers, requests, strict=True)):
        texts = judgments[2 * i : 2 * i + 2]
        parsed = [parse_rating(text) for text in texts]
        records.append(
            {
                "question_id": question.question_id,
                "category": question.category,
                "turns": list(question.turns),
                "answers": list(answer),
                "judge": judge.name,
                "judge_prompts": [name for name, _ in pair],
                "judgments": texts,
                "ratings": [rating for rating, _ in parsed],
                "rating_errors": [error for _, error in parsed],
            }
        )
    return records


def score(records: list[dict]) -> dict:
    """Means of the rated turns: overall (the MT-Bench score), per turn and per category; missing ratings counted.

    Returns:
        ``{"score", "turn_1", "turn_2", "categories": {name: mean}, "ratings": {question_id: [r1, r2]},
        "n_questions", "n_rated", "missing_ratings"}``; a mean over no rated turn is None.
    """

    def mean(values):
        rated = [v for v in values if v is not None]
        return round(statistics.fmean(rated), 4) if rated else None

    every = [r for record in records for r in record["ratings"]]
    categories = {}
    for record in records:
        categories.setdefault(record["category"], []).extend(record["ratings"])
    missing = sum(r is None for r in every)
    return {
        "score": mean(every),
        "turn_1": mean(record["ratings"][0] for record in records),
        "turn_2": mean(record["ratings"][1] for record in records),
        "categories": {name: mean(values) for name, values in categories.items()},
        "ratings": {str(record["question_id"]): record["ratings"] for record in records},
        "n_questions": len(records),
        "n_rated": len(every) - missing,
        "missing_ratings": missing,
    }


def mtbench_config_problems(mtbench, data_dir: str | Path) -> list[str]:
    """Everything wrong with an ``eval.mtbench`` block, without loading a model or calling the judge."""
    if not isinstance(mtbench, dict):
        return [f"eval.mtbench must be a mapping ({', '.join(MTBENCH_KEYS)}) or null, got {mtbench!r}"]
    problems = []
    unknown = set(mtbench) - set(MTBENCH_KEYS)
    if unknown:
        problems.append(f"eval.mtbench: unknown keys {sorted(unknown)} (known: {', '.join(MTBENCH_KEYS)})")
    try:
        load_questions(question_file(mtbench, data_dir), mtbench.get("references"))
    except MTBenchError as err:
        problems.append(f"eval.mtbench: {err}")
    return problems + judge_config_problems(mtbench.get("judge"))


def validate_mtbench(cfg: dict) -> None:
    """Checks a run's ``eval.mtbench`` before anything is trained (nothing to check when it is null or absent).

    Raises:
        MTBenchError: Every problem at once (see `mtbench_config_problems`).
    """
    mtbench = cfg["eval"].get("mtbench")
    if mtbench is None:
        return
    problems = mtbench_config_problems(mtbench, cfg["paths"]["data_dir"])
    if problems:
        raise MTBenchError("invalid eval.mtbench config:\n  - " + "\n  - ".join(problems))


def question_file(mtbench: dict, data_dir: str | Path) -> Path:
    """``eval.mtbench.questions``, or the shipped MT-Bench-style set under ``data_dir`` when it is null."""
    return Path(mtbench["questions"]) if mtbench.get("questions") else Path(data_dir) / QUESTIONS_FILE


def run_mtbench(model, tokenizer, cfg: dict, out_dir: str | Path) -> dict:
    """The whole evaluation of a run's ``eval.mtbench``: answer, then judge, write the predictions, score.

    The judge is built after the answers are generated, so a local judge model is loaded only for the grading (on
    the evaluated model's device).
    ``eval.limit`` (a deterministic question subset), ``eval.max_new_tokens`` (the answer budget, default 1024) and
    ``eval.batch_size`` apply as for the other tasks.

    Returns:
        `score`'s result plus ``judge`` (its name) and ``questions`` (the question file).
    """
    ev, mtbench = cfg["eval"], cfg["eval"]["mtbench"]
    path = question_file(mtbench, cfg["paths"]["data_dir"])
    questions = select_questions(load_questions(path, mtbench.get("references")), ev.get("limit"), cfg["seed"])
    budget, batch_size = ev.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS, ev.get("batch_size", 8)
    log.info("MT-Bench: answering %d questions (2 turns, up to %d tokens each)", len(questions), budget)
    template = (cfg.get("data") or {}).get("template", "alpaca")  # as the model was trained
    answers = answer_questions(model, tokenizer, questions, budget, batch_size, template)
    judge = build_judge(mtbench["judge"], cache_dir=cfg["paths"].get("cache_dir"), device=model.device)
    log.info("MT-Bench: %s grades %d turns", judge.name, 2 * len(questions))
    records = grade(questions, answers, judge)
    write_predictions(Path(out_dir) / "predictions" / "mtbench.jsonl", records)
    result = {**score(records), "judge": judge.name, "questions": str(path)}
    if result["missing_ratings"]:
        log.warning(
            "MT-Bench: %d of %d judgments had no usable rating (left out of the means; see rating_errors in "
            "predictions/mtbench.jsonl)",
            result["missing_ratings"],
            2 * len(records),
        )
    return result


def mtbench_metrics(result: dict | None) -> dict[str, float]:
    """The logger's flat MT-Bench metrics: score, per turn, per category, and the missing-rating count."""
    if not result:
        return {}
    metrics = {f"mtbench/{key}": result[key] for key in ("score", "turn_1", "turn_2", "missing_ratings")}
    metrics |= {f"mtbench/{name}": value for name, value in result["categories"].items()}
    return {key: value for key, value in metrics.items() if value is not None}


def _jsonl(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise MTBenchError(
            f"{what} file {path} does not exist; set eval.mtbench.questions (or .references) to an existing file, "
            "e.g. FastChat's data/mt_bench/question.jsonl"
        )
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as err:
            raise MTBenchError(f"{path}:{line_no}: not a JSON line ({err.msg}); the file must be JSON Lines") from None


def _two_texts(value, allow_empty: bool) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, str) and (allow_empty or v.strip()) for v in value)
    )


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."
