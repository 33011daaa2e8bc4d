"""Held-out loss (s2ft/evaluation/heldout.py): mean response-token NLL, exact against a per-item reference."""

import pytest
import torch

from s2ft.data import DataError, Example
from s2ft.data.tokenize import tokenize_examples
from s2ft.evaluation import heldout_item_losses, heldout_loss, mean_token_loss
from s2ft.models import tiny_model

EXAMPLES = [
    Example("t-0", "t", "What is 2 + 3?", "", "2 + 3 = 5. The answer is 5.", "5"),
    Example("t-1", "t", "Is the sky blue?", "", "the correct answer is true", "true"),
    Example("t-2", "t", "Name a color.", "Pick a warm one.", "red", "red"),
]


def reference_items(model, tokenizer, examples, max_length):
    """(summed NLL, token count) of the labelled tokens of each item, one unpadded item at a time."""
    items = []
    for item in tokenize_examples(examples, tokenizer, max_length):
        ids, labels = item["input_ids"], item["labels"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        scored = [t for t in range(1, len(ids)) if labels[t] != -100]
        items.append((-sum(logprobs[t - 1, labels[t]].item() for t in scored), len(scored)))
    return items


def reference_loss(model, tokenizer, examples, max_length):
    """Token-weighted mean NLL of the labelled tokens."""
    items = reference_items(model, tokenizer, examples, max_length)
    return sum(nll for nll, _ in items) / sum(count for _, count in items)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_matches_the_per_item_reference(model64, tokenizer, batch_size):
    expected = reference_loss(model64, tokenizer, EXAMPLES, max_length=256)
    assert heldout_loss(model64, tokenizer, EXAMPLES, batch_size=batch_size, max_length=256) == pytest.approx(
        expected, rel=1e-12
    )


def test_truncation_follows_training(model64, tokenizer):
    # With a short max_length only the first response tokens count, exactly as in training.
    full = heldout_loss(model64, tokenizer, EXAMPLES, batch_size=3, max_length=256)
    cut = heldout_loss(model64, tokenizer, EXAMPLES, batch_size=3, max_length=165)
    assert cut == pytest.approx(reference_loss(model64, tokenizer, EXAMPLES, max_length=165), rel=1e-12)
    assert cut != full


def test_training_mode_is_restored(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.train()
    heldout_loss(model, tokenizer, EXAMPLES[:1], batch_size=1, max_length=256)
    assert model.training


@pytest.mark.parametrize(
    ("examples", "batch_size", "message"),
    [
        ([], 2, "got no examples"),
        (EXAMPLES, 0, "batch_size must be a positive integer"),
        ([Example("t-9", "t", "Question?", "", " ", "x")], 2, "empty output: \\['t-9'\\]"),
    ],
)
def test_bad_input(model64, tokenizer, examples, batch_size, message):
    with pytest.raises(ValueError, match=message):
        heldout_loss(model64, tokenizer, examples, batch_size=batch_size, max_length=256)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_item_losses_match_the_per_item_reference(model64, tokenizer, batch_size):
    items = heldout_item_losses(model64, tokenizer, EXAMPLES, batch_size=batch_size, max_length=256)
    assert [item["id"] for item in items] == [e.id for e in EXAMPLES]
    for item, (nll, count) in zip(items, reference_items(model64, tokenizer, EXAMPLES, 256), strict=True):
        assert item["tokens"] == count
        assert item["nll"] == pytest.approx(nll, rel=1e-12)
    assert mean_token_loss(items) == heldout_loss(model64, tokenizer, EXAMPLES, batch_size=3, max_length=256)


def test_items_without_a_response_token_are_left_out(model64, tokenizer, caplog):
    # Byte tokens: at max_length 150 only the shortest prompt (143 bytes) leaves room for response tokens.
    short = Example("t-s", "t", "Hi?", "", "yes", "yes")
    items = heldout_item_losses(model64, tokenizer, [*EXAMPLES, short], batch_size=2, max_length=150)
    assert [item["id"] for item in items] == ["t-s"]
    assert "dropped 3 held-out items whose prompt fills max_length=150" in caplog.text
    # A user's error, which run.py reports as one line (with eval.before=false it shows only after training).
    with pytest.raises(DataError, match="max_length=150 tokens long, leaving no response token to score: raise data"):
        heldout_item_losses(model64, tokenizer, EXAMPLES, batch_size=2, max_length=150)
