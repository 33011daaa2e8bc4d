"""Writes a user's data set for the README's "your own data" example: ARC-Easy items as a plain multiple-choice file.

`examples/user_data/train.jsonl` (alpaca records: the question with lettered choices, the letter as the response) and
`examples/user_data/test.json` (the same form, with the gold letter in `answer` and the choices in `options`, so the
task also runs in log-likelihood mode), drawn from the local ARC-Easy train and test files (data/README.md: CC BY-SA).

    python -m experiments.study.user_example [--train 300] [--test 100] [--out examples/user_data]
"""

import argparse
import json
import random
from pathlib import Path

from s2ft.data import read_llm_adapters
from s2ft.evaluation.options import OPTION_MARKER, parse_options

ROOT = Path(__file__).resolve().parents[2]
ARC = ROOT / "data" / "llm-adapters" / "dataset" / "ARC-Easy"
LETTERS = "ABCDE"
LABELS = tuple(f"answer{i}" for i in range(1, 6))


def convert(example) -> dict:
    """One ARC item as {instruction, output, answer, options}: "Question...\\nA) ...\\nB) ..." and its letter."""
    options = list(parse_options(example.instruction, "label", LABELS).values())
    question = OPTION_MARKER.split(example.instruction, maxsplit=1)[0]
    question = question.replace("Please choose the correct answer to the question:", "").strip()
    choices = "\n".join(f"{LETTERS[i]}) {text}" for i, text in enumerate(options))
    letter = LETTERS[LABELS.index(example.answer)]
    return {"instruction": f"{question}\n{choices}\nAnswer with the letter.", "output": letter, "options": options}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "user_data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = random.Random(0).sample(read_llm_adapters(ARC / "train.json", "arc_easy"), args.train)
    test = random.Random(0).sample(read_llm_adapters(ARC / "test.json", "arc_easy"), args.test)
    with (args.out / "train.jsonl").open("w") as file:
        for example in train:
            record = convert(example)
            file.write(json.dumps({"instruction": record["instruction"], "output": record["output"]}) + "\n")
    records = [convert(example) for example in test]
    tests = [{"instruction": r["instruction"], "answer": r["output"], "options": r["options"]} for r in records]
    (args.out / "test.json").write_text(json.dumps(tests, indent=1) + "\n")
    print(f"wrote {args.train} training and {args.test} test items to {args.out}")


if __name__ == "__main__":
    main()
