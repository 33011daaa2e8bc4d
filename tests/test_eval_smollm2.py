"""The evaluator on the real SmolLM2-135M-Instruct and real benchmark prompts (slow: ~1-3 min on one CPU core)."""

import pytest
from conftest import DATA

from s2ft.data import build_prompt, eval_subset, load_eval
from s2ft.evaluation import evaluate, generate
from s2ft.models import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = build_model("smollm2_135m")
    return model.eval(), tokenizer


def real_prompts() -> list[str]:
    items = eval_subset(load_eval("arc_easy", DATA), 4) + eval_subset(load_eval("gsm8k", DATA), 4)
    return [build_prompt(example.instruction, example.input) for example in items]


def test_greedy_generation_is_batch_size_invariant_on_real_prompts(smollm2):
    model, tokenizer = smollm2
    prompts = real_prompts()
    alone = [generate(model, tokenizer, [prompt], max_new_tokens=32)[0] for prompt in prompts]
    batched = generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=8)
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    assert len({g.text for g in alone}) == len(prompts)
    print([g.text for g in alone])


def test_option_loglik_on_arc_easy_is_sane(smollm2, tmp_path):
    model, tokenizer = smollm2
    runs = {}
    for batch_size in (1, 8):
        result = evaluate(
            model,
            tokenizer,
            ["arc_easy"],
            data_dir=DATA,
            mode="loglik",
            limit=20,
            batch_size=batch_size,
            out_dir=tmp_path / f"b{batch_size}",
            progress=False,
        )
        runs[batch_size] = result["tasks"]["arc_easy"]
    metrics = runs[8]
    print(
        f"SmolLM2-135M ARC-Easy (20 items) option log-likelihood accuracy: mean {metrics['accuracy_mean']:.2f}, "
        f"sum {metrics['accuracy_sum']:.2f} (chance ~0.25)"
    )
    assert metrics["n"] == 20
    assert metrics["accuracy_mean"] > 0
    assert runs[1]["accuracy_mean"] == metrics["accuracy_mean"] and runs[1]["accuracy_sum"] == metrics["accuracy_sum"]
