"""Tokenization for supervised fine-tuning: loss on the response only, EOS appended, dynamic right padding.

The prompt/response boundary. A token must not straddle it: the prompt tokens have to be exactly those the evaluator
feeds the model (it tokenizes `build_prompt(...)` alone, in the same template), and every response token, and only
those, is a label. The prompt and the full text are tokenized separately; when the full text starts with the
prompt's tokens (the usual case) its tokens are used as they are. When BPE merges across the boundary (the prompt
ends in "\\n" and the LLM-Adapters arithmetic outputs start with "\\n": a vocabulary with a "\\n\\n" token and no
pre-tokenizer split between newlines fuses them), the prompt's tokens are kept and the response is tokenized on its
own and appended, so training sees the same prompt tokens as evaluation and the response text is unchanged.
SmolLM2's tokenizer never needs the fallback on the shipped sets (its pre-tokenizer splits the newlines); a test
covers it with a tokenizer that merges them.
"""

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

import datasets
import pyarrow.compute as pc
import torch

from s2ft.data.prompt import build_prompt
from s2ft.data.records import DataError, Example

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


def encode_batch(
    instructions: list[str], inputs: list[str], outputs: list[str], tokenizer, max_length: int, template: str = "alpaca"
) -> dict[str, list[list[int]]]:
    """Tokenizes items as ``prompt + response + EOS`` with labels -100 on the prompt, cut to ``max_length`` tokens.

    Args:
        instructions, inputs, outputs: Parallel columns of the items.
        tokenizer: A Hugging Face tokenizer with an EOS token.
        max_length: Maximum tokens per item.
        template: The prompt template, "alpaca" or "chat" (`s2ft.data.prompt`).

    Returns:
        Columns ``input_ids``, ``attention_mask`` and ``labels``, one list of ints per item.
    """
    _check_tokenizer(tokenizer, max_length)
    prompts = [
        build_prompt(instruction, input, template, tokenizer)
        for instruction, input in zip(instructions, inputs, strict=True)
    ]
    prompt_ids = tokenizer(prompts)["input_ids"]
    full_ids = tokenizer([prompt + output for prompt, output in zip(prompts, outputs, strict=True)])["input_ids"]
    columns = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, full, output in zip(prompt_ids, full_ids, outputs, strict=True):
        if full[: len(prompt)] == prompt:
            response = full[len(prompt) :]
        else:  # a token merged across the boundary: keep the prompt's own tokens (see the module docstring)
            response = tokenizer(output, add_special_tokens=False)["input_ids"]
        ids = (prompt + response + [tokenizer.eos_token_id])[:max_length]
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(([IGNORE_INDEX] * len(prompt) + ids[len(prompt) :])[:max_length])
    return columns


def _check_tokenizer(tokenizer, max_length: int) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token before tokenizing")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")


def special_token_problems(texts: Iterable[tuple[str, str, str]], tokenizer, where: str) -> list[str]:
    """The items whose text holds one of the tokenizer's special tokens (its EOS, BOS, pad or chat markers).

    The tokenizer reads such a string in an item's text as the control token itself, not as its characters: an EOS
    in a response teaches the model to stop there, a chat marker in a question opens a turn of its own. No shipped
    set holds one; a user's data taken from chat logs or another model's outputs may.

    Args:
        texts: ``(item id, field, text)`` of every text that goes into a prompt or a response (`example_texts`).
        tokenizer: The run's tokenizer.
        where: The set's name for the message, e.g. ``"data.train"``.

    Returns:
        One problem naming the set, the tokens, how many items hold them and the first five (id and field); none
        when no text holds a special token.
    """
    if getattr(tokenizer, "split_special_tokens", False):
        return []  # this tokenizer reads the special tokens' strings in a text as the characters they are
    specials = sorted({token for token in special_tokens(tokenizer) if token})
    tokens, items = set(), {}
    for item_id, field, text in texts:
        found = [token for token in specials if token in text]
        if found:
            tokens.update(found)
            items.setdefault(item_id, []).append(field)
    if not items:
        return []
    named = ", ".join(f"{item_id} ({', '.join(fields)})" for item_id, fields in list(items.items())[:5])
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    return [
        f"{where}: {len(items)} item(s) hold the tokenizer's special token(s) {', '.join(sorted(tokens))} in their "
        f"text: {named}{more}. The tokenizer would read each as its control token, not as text (an EOS in a response "
        "teaches the model to stop there); remove or rewrite them in the data"
    ]


def special_tokens(tokenizer) -> set[str]:
    """The strings a tokenizer reads as a control token: its named special tokens and every added token marked
    special (SmolLM2's ``<repo_name>`` or ``<filename>``, Llama 3's ``<|start_header_id|>``), which
    ``all_special_tokens`` leaves out when the tokenizer's config does not list them as additional special tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return set(tokenizer.all_special_tokens) | {token.content for token in added.values() if token.special}


def example_texts(examples: Iterable[Example]) -> Iterable[tuple[str, str, str]]:
    """``(id, field, text)`` of each example's instruction, input and output, for `special_token_problems`."""
    for example in examples:
        for field in ("instruction", "input", "output"):
            yield example.id, field, getattr(example, field)


def check_special_tokens(sets: dict[str, Iterable[Example]], tokenizer) -> None:
    """Raises DataError naming every set (name -> examples) whose items hold a special token of the tokenizer."""
    refuse_special_tokens(
        [
            problem
            for where, examples in sets.items()
            for problem in special_token_problems(example_texts(examples), tokenizer, where)
        ]
    )


def refuse_special_tokens(problems: list[str]) -> None:
    """Raises DataError with every `special_token_problems` found (one per line), if any."""
    if problems:
        raise DataError("\n".join(problems))


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    max_length: int,
    cache_dir: str | Path | None = None,
    template: str = "alpaca",
) -> datasets.Dataset:
    """Tokenizes examples into a `datasets.Dataset` with ``input_ids``, ``attention_mask`` and ``labels``.

    Items whose prompt alone fills ``max_length`` have no response token left to learn from; they are dropped
    with a warning (an error if that leaves nothing).

    Args:
        examples: The training (or validation) items.
        tokenizer: A Hugging Face tokenizer with an EOS token.
        max_length: Maximum tokens per item, prompt included; longer items lose the end of the response.
        cache_dir: Where `datasets` keeps the tokenized arrow file, keyed by a fingerprint of the examples, the
            tokenizer, max_length and the template, so a rerun reuses it; None tokenizes in memory.
        template: The prompt template, "alpaca" or "chat".

    Raises:
        ValueError: No examples, no EOS token or a bad max_length.
        DataError: No item with a response token left (max_length too short for every prompt), or items holding a
            special token of the tokenizer in their text (`special_token_problems`).
    """
    _check_tokenizer(tokenizer, max_length)
    if not examples:
        raise ValueError("tokenize_examples got no examples")
    check_special_tokens({"the items to tokenize": examples}, tokenizer)
    records = [dataclasses.asdict(example) for example in examples]
    map_kwargs = {}
    if cache_dir is not None:
        # The encoding code is hashed too, so a change to it never serves a stale file.
        key = datasets.fingerprint.Hasher.hash(
            [records, tokenizer, max_length, template, _encode_trainable, has_response, encode_batch, build_prompt]
        )
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        map_kwargs = {"cache_file_name": str(Path(cache_dir) / f"tokenized-{key}.arrow"), "load_from_cache_file": True}
    dataset = datasets.Dataset.from_list(records).map(
        _encode_trainable,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "template": template},
        batched=True,
        remove_columns=list(records[0]),
        desc="tokenizing",
        **map_kwargs,
    )
    if len(dataset) == 0:
        raise DataError(
            f"every prompt of the {len(examples)} items is at least max_length={max_length} tokens long, leaving no "
            "response token to train on: raise data.max_length"
        )
    if len(dataset) < len(examples):
        log.warning("dropped %d items whose prompt fills max_length=%d", len(examples) - len(dataset), max_length)
    cut = _cut_responses(dataset, tokenizer.eos_token_id, max_length)
    if cut:
        # Their loss still counts the response's start, and without its EOS the model learns not to stop there.
        log.warning(
            "%d of %d items are longer than max_length=%d: they train on the start of their response only, without "
            "its end and EOS; raise data.max_length to keep them whole",
            cut,
            len(dataset),
            max_length,
        )
    return dataset


def _cut_responses(dataset: datasets.Dataset, eos_token_id: int, max_length: int) -> int:
    """How many encoded items were cut at max_length: whole ones end in the EOS, cut ones fill max_length without."""
    ids = dataset.data.column("input_ids")
    full = pc.filter(ids, pc.equal(pc.list_value_length(ids), max_length))
    if len(full) == 0:
        return 0
    return pc.sum(pc.not_equal(pc.list_element(full, max_length - 1), eos_token_id)).as_py()


def _encode_trainable(batch: dict[str, list], tokenizer, max_length: int, template: str) -> dict[str, list[list[int]]]:
    # A batched map may return fewer rows: items left without a response token are dropped here, in the same pass.
    columns = encode_batch(batch["instruction"], batch["input"], batch["output"], tokenizer, max_length, template)
    keep = [i for i, labels in enumerate(columns["labels"]) if has_response(labels)]
    return {key: [values[i] for i in keep] for key, values in columns.items()}


def has_response(labels: list[int]) -> bool:
    """Whether an encoded item kept at least one response token (its prompt did not fill max_length)."""
    return any(label != IGNORE_INDEX for label in labels)


class Collator:
    """Pads a batch on the right to its longest item: ``input_ids`` with the pad id, ``attention_mask`` with 0,
    ``labels`` with -100, and returns long tensors.

    Args:
        tokenizer: A tokenizer with a pad token (or the pad id itself as an int).
        pad_to_multiple_of: Round the padded length up to a multiple of this (tensor-core friendly); None: no rounding.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        self.pad_token_id = tokenizer if isinstance(tokenizer, int) else tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos_token)")
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {key: torch.full((len(features), length), value, dtype=torch.long) for key, value in pad_values.items()}
        for row, feature in enumerate(features):
            for key in pad_values:
                values = torch.as_tensor(feature[key], dtype=torch.long)
                batch[key][row, : len(values)] = values
        return batch
