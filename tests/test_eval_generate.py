"""Batched generation (s2ft/evaluation/generate.py): batch-size invariance, per-row EOS and stop rules, ordering."""

import pytest

from s2ft.data import build_prompt
from s2ft.evaluation.generate import generate
from s2ft.models import tiny_model, tiny_tokenizer

BUDGET = 12


@pytest.fixture(scope="module")
def prompts():
    # Lengths differ by up to ~40 tokens, so batches carry real left padding.
    questions = [f"What is {i * 37 % 101} plus {i * i}?" + " Think." * (i % 5) for i in range(10)]
    return [build_prompt(question) for question in questions]


@pytest.fixture(scope="module")
def reference(model, tokenizer, prompts):
    """Each prompt generated alone."""
    return [generate(model, tokenizer, [prompt], max_new_tokens=BUDGET)[0] for prompt in prompts]


def test_batch_size_does_not_change_greedy_outputs(model, tokenizer, prompts, reference):
    batched = generate(model, tokenizer, prompts, max_new_tokens=BUDGET, batch_size=8)
    assert [g.tokens for g in batched] == [g.tokens for g in reference]
    assert [g.text for g in batched] == [g.text for g in reference]
    # The check means something only if the outputs depend on the prompt.
    assert len({tuple(g.tokens) for g in reference}) > len(prompts) // 2


def test_rows_without_eos_use_the_whole_budget(tokenizer, reference):
    for generation in reference:
        if tokenizer.eos_token_id not in generation.tokens:
            assert generation.num_tokens == BUDGET


def test_each_row_stops_at_its_own_eos(model, tokenizer, prompts, reference):
    # Declare as EOS a token that the reference outputs produce at different steps (and some rows never).
    def first_positions(token):
        return [g.tokens.index(token) if token in g.tokens else None for g in reference]

    candidates = {token for g in reference for token in g.tokens}
    eos = max(sorted(candidates), key=lambda token: len(set(first_positions(token))))
    positions = first_positions(eos)
    assert None in positions and len(set(positions)) >= 3
    expected = [g.tokens if p is None else g.tokens[: p + 1] for g, p in zip(reference, positions, strict=True)]
    model.generation_config.eos_token_id = eos
    try:
        for batch_size in (1, 4, 10):
            outputs = generate(model, tokenizer, prompts, max_new_tokens=BUDGET, batch_size=batch_size)
            assert [g.tokens for g in outputs] == expected
            for generation in outputs:
                body = generation.tokens[:-1] if generation.tokens[-1] == eos else generation.tokens
                assert generation.text == tokenizer.decode(body, skip_special_tokens=True)
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def test_stop_rule_ends_a_row_at_the_first_token_that_satisfies_it(model, tokenizer, prompts, reference):
    def stop(text):
        return len(text) >= 4

    expected = []
    for generation in reference:
        ends = [k for k in range(1, len(generation.tokens) + 1) if stop(tokenizer.decode(generation.tokens[:k]))]
        expected.append(generation.tokens[: ends[0]] if ends else generation.tokens)
    assert any(len(tokens) < BUDGET for tokens in expected)
    for batch_size in (1, 8):
        outputs = generate(model, tokenizer, prompts, max_new_tokens=BUDGET, batch_size=batch_size, stop=stop)
        assert [g.tokens for g in outputs] == expected


def test_beam_search_is_batch_size_invariant(model, tokenizer, prompts):
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, num_beams=4)[0].tokens for p in prompts[:4]]
    batched = generate(model, tokenizer, prompts[:4], max_new_tokens=6, num_beams=4, batch_size=4)
    assert [g.tokens for g in batched] == alone
    assert all(1 <= len(tokens) <= 6 for tokens in alone)


def test_padding_side_is_restored_and_progress_is_reported(model, tokenizer, prompts):
    tokenizer.padding_side = "right"
    seen = []
    generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=4, on_batch=seen.append)
    assert tokenizer.padding_side == "right"
    assert seen == [4, 4, 2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=4, batch_size=0), "batch_size must be a positive integer"),
        (dict(max_new_tokens=4, num_beams=True), "num_beams must be a positive integer"),
    ],
)
def test_bad_arguments(model, tokenizer, prompts, options, message):
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, prompts, **options)


def test_tokenizer_without_pad_token_is_refused(model, prompts):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        generate(model, tokenizer, prompts, max_new_tokens=2)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_families_are_batch_size_invariant(tokenizer, prompts, family):
    model = tiny_model(family, vocab_size=len(tokenizer), initializer_range=0.2).eval()
    alone = [generate(model, tokenizer, [prompt], max_new_tokens=6)[0].tokens for prompt in prompts[:5]]
    batched = generate(model, tokenizer, prompts[:5], max_new_tokens=6, batch_size=5)
    assert [g.tokens for g in batched] == alone
