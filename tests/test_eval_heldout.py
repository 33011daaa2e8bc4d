"""Held-out loss (s2ft/evaluation/heldout.py): mean response-token NLL, exact against a per-item reference."""

import pytest
import torch

from s2ft.data import Example
from s2ft.data.tokenize import tokenize_examples
from s2ft.evaluation import heldout_loss
from s2ft.models import tiny_model

EXAMPLES = [
    Example("t-0", "t", "What is 2 + 3?", "", "2 + 3 = 5. The answer is 5.", "5"),
    Example("t-1", "t", "Is the sky blue?", "", "the correct answer is true", "true"),
    Example("t-2", "t", "Name a color.", "Pick a warm one.", "red", "red"),
]


def reference_loss(model, tokenizer, examples, max_length):
    """Token-weighted mean NLL of the labelled tokens, one unpadded item at a time."""
    total, count = 0.0, 0
    for item in tokenize_examples(examples, tokenizer, max_length):
        ids, labels = item["input_ids"], item["labels"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for t in range(1, len(ids)):
            if labels[t] != -100:
                total -= logprobs[t - 1, labels[t]].item()
                count += 1
    return total / count


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
