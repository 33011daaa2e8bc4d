"""Response log-likelihood scoring (s2ft/evaluation/loglik.py): exact against a one-sequence reference, batch-free."""

import pytest
import torch

from s2ft.data import build_prompt
from s2ft.evaluation.loglik import Score, encode_pairs, score_pairs
from s2ft.models import tiny_model

INSTRUCTIONS = ["Is the sky blue?", "Pick one: Roots or Stems", "Which is heavier, a rock or a leaf? Think."]
RESPONSES = ["true", "Roots", "a rock, because stones are dense"]


@pytest.fixture(scope="module")
def pairs(tokenizer):
    # Every instruction with every response: 9 pairs of different lengths sharing prompts.
    instructions = [i for i in INSTRUCTIONS for _ in RESPONSES]
    responses = RESPONSES * len(INSTRUCTIONS)
    return encode_pairs(instructions, [""] * len(instructions), responses, tokenizer)


def reference_score(model, ids, labels):
    """Log-likelihood of the labelled tokens of one unpadded sequence, token by token."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    total = sum(logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100)
    return total, sum(label != -100 for label in labels)


def test_encode_pairs_keeps_the_prompt_tokens_and_drops_the_eos(tokenizer, pairs):
    prompt_ids = tokenizer(build_prompt(INSTRUCTIONS[0]))["input_ids"]
    for (ids, labels), response in zip(pairs[: len(RESPONSES)], RESPONSES, strict=True):
        assert ids[: len(prompt_ids)] == prompt_ids
        assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
        assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]
        assert tokenizer.decode(ids[len(prompt_ids) :]) == response
        assert tokenizer.eos_token_id not in ids


def test_scores_match_a_one_sequence_reference(model64, tokenizer, pairs):
    scores = score_pairs(model64, pairs, pad_token_id=tokenizer.pad_token_id, batch_size=4)
    for score, (ids, labels) in zip(scores, pairs, strict=True):
        total, count = reference_score(model64, ids, labels)
        assert score.num_tokens == count
        assert score.logprob == pytest.approx(total, rel=1e-12, abs=1e-10)
        assert score.mean == pytest.approx(total / count, rel=1e-12, abs=1e-10)


@pytest.mark.parametrize("batch_size", [2, 5, 9])
def test_batch_size_does_not_change_scores(model64, tokenizer, pairs, batch_size):
    alone = score_pairs(model64, pairs, pad_token_id=tokenizer.pad_token_id, batch_size=1)
    batched = score_pairs(model64, pairs, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
    for a, b in zip(alone, batched, strict=True):
        assert b.num_tokens == a.num_tokens
        assert b.logprob == pytest.approx(a.logprob, rel=1e-12, abs=1e-10)


def test_fp32_scores_are_batch_invariant_to_float_tolerance(model, tokenizer, pairs):
    alone = score_pairs(model, pairs, pad_token_id=tokenizer.pad_token_id, batch_size=1)
    batched = score_pairs(model, pairs, pad_token_id=tokenizer.pad_token_id, batch_size=9)
    for a, b in zip(alone, batched, strict=True):
        assert b.logprob == pytest.approx(a.logprob, rel=1e-5, abs=1e-5)


def test_pad_token_value_does_not_matter(model64, tokenizer, pairs):
    a = score_pairs(model64, pairs, pad_token_id=tokenizer.pad_token_id, batch_size=9)
    b = score_pairs(model64, pairs, pad_token_id=77, batch_size=9)
    assert [s.logprob for s in a] == pytest.approx([s.logprob for s in b], rel=1e-12, abs=1e-10)


def test_score_mean_is_per_token():
    assert Score(-6.0, 3).mean == -2.0


def test_empty_response_is_refused(tokenizer):
    with pytest.raises(ValueError, match="no tokens to score"):
        encode_pairs(["Is it?"], [""], [""], tokenizer)


def test_bad_batch_size(model64, tokenizer, pairs):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        score_pairs(model64, pairs, pad_token_id=0, batch_size=0)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_families_match_the_reference(tokenizer, pairs, family):
    model = tiny_model(family, vocab_size=len(tokenizer), initializer_range=0.2).double().eval()
    scores = score_pairs(model, pairs, pad_token_id=tokenizer.pad_token_id, batch_size=3)
    for score, (ids, labels) in zip(scores, pairs, strict=True):
        assert score.logprob == pytest.approx(reference_score(model, ids, labels)[0], rel=1e-12, abs=1e-10)


def test_unmerged_peft_model_matches_the_reference(tokenizer, pairs):
    # LoRA/DoRA runs score through PEFT's wrapper: the cache and logits_to_keep arguments must reach the base model.
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", vocab_size=len(tokenizer), initializer_range=0.2).double()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    model.eval()
    scores = score_pairs(model, pairs, pad_token_id=tokenizer.pad_token_id, batch_size=4)
    for score, (ids, labels) in zip(scores, pairs, strict=True):
        assert score.logprob == pytest.approx(reference_score(model, ids, labels)[0], rel=1e-12, abs=1e-10)


def test_prompt_pass_projects_only_its_last_position(model64, tokenizer, pairs):
    shapes = []
    hook = model64.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    try:
        score_pairs(model64, pairs, pad_token_id=tokenizer.pad_token_id, batch_size=9)
    finally:
        hook.remove()
    assert shapes[0] == (len(INSTRUCTIONS), 1, len(tokenizer))
