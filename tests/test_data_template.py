"""The prompt templates (s2ft/data/prompt.py): alpaca and the tokenizer's chat template, alike in training,
evaluation and held-out losses, checked in the config and recorded in the summary."""

import json

import pytest

from s2ft.data import TASKS
from s2ft.data.prompt import PROMPT_NO_INPUT, PromptTemplateError, build_prompt
from s2ft.data.records import Example
from s2ft.data.tokenize import IGNORE_INDEX, encode_batch, tokenize_examples
from s2ft.evaluation import evaluate, heldout_item_losses
from s2ft.evaluation.loglik import encode_pairs
from s2ft.lightning.summary import build_summary
from s2ft.models import tiny_model, tiny_tokenizer

# ChatML, the format of SmolLM2-Instruct's template (without its default system turn).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


def test_chat_prompt_is_the_tokenizers_template_with_one_user_turn(chat_tokenizer):
    assert build_prompt(" What is 2 + 2? ", "", "chat", chat_tokenizer) == (
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_prompt("Add.", " 2 and 2 ", "chat", chat_tokenizer) == (
        "<|im_start|>user\nAdd.\n\n2 and 2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_prompt("Add.", "", "alpaca", chat_tokenizer) == PROMPT_NO_INPUT.format(instruction="Add.")


def test_chat_needs_a_chat_template_and_unknown_templates_are_refused():
    with pytest.raises(PromptTemplateError, match="has none; use data.template=alpaca"):
        build_prompt("Q?", "", "chat", tiny_tokenizer())
    with pytest.raises(PromptTemplateError, match="unknown prompt template 'vicuna'"):
        build_prompt("Q?", "", "vicuna")


def test_chat_training_labels_are_exactly_the_response_and_eos(chat_tokenizer):
    columns = encode_batch(["What is 2 + 2?"], [""], ["4"], chat_tokenizer, 256, "chat")
    prompt_ids = chat_tokenizer(build_prompt("What is 2 + 2?", "", "chat", chat_tokenizer))["input_ids"]
    ids, labels = columns["input_ids"][0], columns["labels"][0]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == chat_tokenizer("4", add_special_tokens=False)["input_ids"] + [
        chat_tokenizer.eos_token_id
    ]


def test_the_template_changes_the_cached_tokenization(chat_tokenizer, tmp_path):
    examples = [Example("t-0", "t", "What is 2 + 2?", "", "4", "4")]
    alpaca = tokenize_examples(examples, chat_tokenizer, 256, tmp_path, "alpaca")
    chat = tokenize_examples(examples, chat_tokenizer, 256, tmp_path, "chat")
    assert alpaca[0]["input_ids"] != chat[0]["input_ids"]
    assert len(list(tmp_path.glob("tokenized-*.arrow"))) == 2


def test_evaluation_and_heldout_losses_use_the_template(chat_tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(chat_tokenizer), initializer_range=0.2).eval()
    task = tmp_path / TASKS["boolq"].path
    task.parent.mkdir(parents=True)
    record = {"instruction": "Is it? Answer format: true/false", "input": "", "output": "", "answer": "true"}
    task.write_text(json.dumps([record]))
    evaluate(model, chat_tokenizer, ["boolq"], data_dir=tmp_path, out_dir=tmp_path, progress=False, template="chat")
    record = json.loads((tmp_path / "predictions" / "boolq.jsonl").read_text())
    assert record["prompt"] == "<|im_start|>user\nIs it? Answer format: true/false<|im_end|>\n<|im_start|>assistant\n"
    items = [Example("h-0", "h", "Is it?", "", "yes it is", "")]
    chat = heldout_item_losses(model, chat_tokenizer, items, 4, 256, "chat")
    alpaca = heldout_item_losses(model, chat_tokenizer, items, 4, 256, "alpaca")
    assert chat[0]["tokens"] == alpaca[0]["tokens"] == len("yes it is") + 1  # byte tokens + EOS
    assert chat[0]["nll"] != alpaca[0]["nll"]
    ((ids, labels),) = encode_pairs(["Is it?"], [""], ["yes"], chat_tokenizer, "chat")
    assert chat_tokenizer.decode(ids[: labels.index(next(x for x in labels if x != IGNORE_INDEX))]).endswith(
        "<|im_start|>assistant\n"
    )


def test_summary_records_the_template():
    cfg = {
        "name": "x",
        "method": {"name": "none"},
        "model": {"name": "tiny_llama"},
        "seed": 0,
        "data": {"template": "chat"},
        "paths": {"root": "/nonexistent"},
    }
    assert build_summary(cfg, {}, None, None)["template"] == "chat"
