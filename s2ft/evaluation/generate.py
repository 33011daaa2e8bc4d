"""Batched generation for evaluation: left padding, KV cache, per-row stopping, batches sorted by prompt length.

Hugging Face `generate` already does what batch-size invariance needs: with left padding it derives position ids
from the attention mask (so a padded row sees the positions it would see alone), masks the pad keys, and pads rows
that finished (EOS or a stop rule) while the others continue; the batch stops when every row is done. The tests
check that batch size 1 and 8 give identical greedy outputs in fp32, on a tiny model and on SmolLM2.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from s2ft.checks import require_positive_int


@dataclass
class Generation:
    """The response to one prompt.

    Attributes:
        text: The decoded response (special tokens removed, the EOS not included).
        tokens: The token ids the model produced for it, the final EOS included when it ended on one.
    """

    text: str
    tokens: list[int]

    @property
    def num_tokens(self) -> int:
        """How many tokens the model produced (the EOS included)."""
        return len(self.tokens)


class RowEnds(StoppingCriteria):
    """Records where each row's response ends (EOS or the ``stop`` rule) and finishes rows stopped by the rule.

    Hugging Face pads a finished row with the pad token, which may equal the EOS token, so the output alone does not
    say where a response stopped; this records it at the step it happens.

    Args:
        tokenizer: Decodes the generated tokens for ``stop``.
        prompt_length: Length of the (padded) prompt in the batch; the response starts after it.
        eos: The EOS token ids.
        stop: Optional predicate on the response text so far.
    """

    def __init__(self, tokenizer, prompt_length: int, eos: list[int], stop: Callable[[str], bool] | None):
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, stop
        self.eos = torch.tensor(eos)
        self.lengths: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        ended = torch.isin(input_ids[:, -1], self.eos.to(input_ids.device)).tolist()
        for row, is_eos in enumerate(ended):
            if row in self.lengths:
                continue
            if is_eos:
                self.lengths[row] = generated
            elif self.stop is not None:
                text = self.tokenizer.decode(input_ids[row, self.prompt_length :], skip_special_tokens=True)
                if self.stop(text):
                    self.lengths[row] = generated
        return torch.tensor([row in self.lengths for row in range(len(ended))], device=input_ids.device)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS (what training appends) and the model's own ones."""
    ids = {tokenizer.eos_token_id}
    model_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(model_eos if isinstance(model_eos, list) else [model_eos])
    ids.discard(None)
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token; set tokenizer.eos_token")
    return sorted(ids)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    num_beams: int = 1,
    stop: Callable[[str], bool] | None = None,
    on_batch: Callable[[int], None] | None = None,
    adapter_names: list[str] | None = None,
) -> list[Generation]:
    """Generates a response to every prompt, greedily (or with beam search), in the prompts' order.

    Prompts are tokenized as training tokenizes them (the tokenizer's default special tokens), sorted longest first
    so each batch holds similar lengths (little padding, and an out-of-memory error shows in the first batch), and
    the results are put back in the input order.

    Args:
        model: A causal LM; it is used as it is (call ``model.eval()`` first).
        tokenizer: Its tokenizer; must have a pad token. Its padding side is set to "left" for the call and restored.
        prompts: The full prompts (e.g. from `s2ft.data.build_prompt`).
        max_new_tokens: Generation budget per prompt.
        batch_size: Prompts per `generate` call.
        num_beams: 1 for greedy decoding, more for beam search (the paper uses 4).
        stop: Optional predicate on the response so far; a row stops as soon as it is true. Applied in greedy
            decoding only (beam hypotheses end at EOS or ``max_new_tokens``).
        on_batch: Called with the number of prompts after each batch (progress display).
        adapter_names: One adapter per prompt, for a mixed-adapter model (`s2ft.load_adapters`): a batch then mixes
            rows of different adapters. Greedy decoding only (beam search expands the rows).

    Returns:
        One `Generation` per prompt, in order.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos_token)")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("num_beams", num_beams)):
        require_positive_int(name, value)
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"adapter_names has {len(adapter_names)} names for {len(prompts)} prompts; one per prompt")
    if adapter_names is not None and num_beams != 1:
        raise ValueError("mixed-adapter batches decode greedily (num_beams=1); beam search expands the batch's rows")
    eos = eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=num_beams,
        early_stopping=num_beams > 1,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )
    encoded = tokenizer(prompts)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[Generation | None] = [None] * len(prompts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt").to(model.device)
            prompt_length = batch["input_ids"].shape[1]
            ends = RowEnds(tokenizer, prompt_length, eos, stop if num_beams == 1 else None)
            criteria = StoppingCriteriaList([ends] if num_beams == 1 else [])
            names = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in rows]}
            output = model.generate(**batch, generation_config=config, stopping_criteria=criteria, **names)
            for position, (row, tokens) in enumerate(zip(rows, output[:, prompt_length:].tolist(), strict=True)):
                if num_beams == 1:
                    # Greedy: the recorded end, or every generated column when the row never finished.
                    length = ends.lengths.get(position, len(tokens))
                else:
                    # Beam search pads a finished hypothesis after its EOS, so the first EOS ends the response.
                    length = next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))
                results[row] = _response(tokens[:length], eos, tokenizer)
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        tokenizer.padding_side = padding_side
    return results


def _response(tokens: list[int], eos: list[int], tokenizer) -> Generation:
    text_tokens = tokens[:-1] if tokens and tokens[-1] in eos else tokens
    return Generation(tokenizer.decode(text_tokens, skip_special_tokens=True), tokens)
