"""Log-likelihood of responses given prompts, batched and exact: the scorer behind multiple-choice evaluation.

Each (prompt, response) pair is tokenized exactly as training tokenizes an item (`s2ft.data.tokenize.encode_batch`:
the prompt alone, then the response tokens), without the EOS training appends: an option is scored as the start of
an answer, not as the whole answer. The options of a question share its prompt, which runs once (see `score_pairs`).
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from s2ft.checks import require_positive_int
from s2ft.data.tokenize import IGNORE_INDEX, encode_batch

# No truncation: a scored option must be complete (prompts here are a few hundred tokens).
NO_TRUNCATION = 1 << 30


@dataclass
class Score:
    """The log-likelihood of one response.

    Attributes:
        logprob: Sum of the response tokens' log-probabilities (natural log).
        num_tokens: Number of response tokens.
    """

    logprob: float
    num_tokens: int

    @property
    def mean(self) -> float:
        """Mean log-probability per response token (the length-normalised score)."""
        return self.logprob / self.num_tokens


def encode_pairs(
    instructions: list[str], inputs: list[str], responses: list[str], tokenizer, template: str = "alpaca"
) -> list[tuple]:
    """Tokenizes (instruction, input, response) triples into ``(input_ids, labels)`` without the trailing EOS."""
    columns = encode_batch(instructions, inputs, responses, tokenizer, NO_TRUNCATION, template)
    pairs = []
    for ids, labels, response in zip(columns["input_ids"], columns["labels"], responses, strict=True):
        ids, labels = ids[:-1], labels[:-1]  # drop the EOS, the last token encode_batch appends
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"response {response!r} has no tokens to score")
        pairs.append((ids, labels))
    return pairs


@torch.inference_mode()
def score_pairs(
    model,
    pairs: list[tuple[list[int], list[int]]],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    adapter_names: list[str] | None = None,
) -> list[Score]:
    """Scores tokenized pairs (from `encode_pairs`): the log-likelihood of the labelled (response) tokens.

    Pairs that share a prompt (the options of one question) run the prompt once: a batch of distinct prompts goes
    through the model left-padded, with position ids counted from each prompt's first real token; its KV cache is
    then repeated for every response of that prompt and the right-padded responses run on top of it. Masks and
    positions make each score what the pair gives alone (the tests compare against single unpadded sequences).

    Args:
        model: A causal LM (call ``model.eval()`` first).
        pairs: ``(input_ids, labels)`` per item: labels -100 on the prompt, then the response tokens.
        pad_token_id: Fills the padding (its value never affects a score).
        batch_size: Distinct prompts per forward batch.
        on_batch: Called with the number of pairs scored after each batch.
        adapter_names: One adapter per pair, for a mixed-adapter model (`s2ft.load_adapters`): a prompt is shared
            only by the pairs of one adapter, and a batch mixes rows of different adapters.

    Returns:
        One `Score` per pair, in order; log-softmax taken in float64 from the model's logits.
    """
    require_positive_int("batch_size", batch_size)
    if adapter_names is not None and len(adapter_names) != len(pairs):
        raise ValueError(f"adapter_names has {len(adapter_names)} names for {len(pairs)} pairs; give one per pair")
    # Keyed by (adapter, prompt tokens): the prompts a batch runs once, each under its own adapter.
    by_prompt: dict[tuple[str | None, tuple[int, ...]], list[int]] = {}
    for index, (ids, labels) in enumerate(pairs):
        start = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
        adapter = None if adapter_names is None else adapter_names[index]
        by_prompt.setdefault((adapter, tuple(ids[:start])), []).append(index)
    prompts = sorted(by_prompt, key=lambda key: len(key[1]), reverse=True)
    scores: list[Score | None] = [None] * len(pairs)
    for begin in range(0, len(prompts), batch_size):
        batch = prompts[begin : begin + batch_size]
        members = [by_prompt[key] for key in batch]
        responses = [pairs[i][0][len(key[1]) :] for key, rows in zip(batch, members, strict=True) for i in rows]
        names = None if adapter_names is None else [adapter for adapter, _ in batch]
        logprobs = _score_batch(
            model, [list(key[1]) for key in batch], [len(rows) for rows in members], responses, pad_token_id, names
        )
        for index, score in zip([i for rows in members for i in rows], logprobs, strict=True):
            scores[index] = score
        if on_batch is not None:
            on_batch(len(responses))
    return scores


def _score_batch(
    model,
    prompts: list[list[int]],
    counts: list[int],
    responses: list[list[int]],
    pad_token_id: int,
    adapter_names: list[str] | None = None,
) -> list[Score]:
    device = model.device
    prompt_ids, prompt_mask = _pad(prompts, pad_token_id, left=True)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    parameters = _forward_parameters(model)
    # Only the prompt's last position predicts a scored token: projecting the whole prompt onto the vocabulary would
    # cost about a fifth of a small model's forward and a (prompts x length x vocab) tensor.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    owner = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(counts))
    names, rest_names = {}, {}
    if adapter_names is not None:
        names = {"adapter_names": adapter_names}
        rest_names = {"adapter_names": [adapter_names[o] for o in owner.tolist()]}
    out = model(
        input_ids=prompt_ids.to(device),
        attention_mask=prompt_mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **last_only,
        **names,
    )
    response_ids, response_mask = _pad(responses, pad_token_id, left=False)
    # The first response token is predicted by the prompt's last position, shared by all its responses.
    first = torch.log_softmax(out.logits[:, -1].double(), dim=-1)[owner.to(device), response_ids[:, 0].to(device)]
    sums = first.clone()
    if response_ids.shape[1] > 1:
        cache_name = "past_key_values" if "past_key_values" in parameters and "cache" not in parameters else "cache"
        cache = getattr(out, cache_name)
        cache.batch_select_indices(owner.to(device))
        lengths = prompt_mask.sum(-1)[owner]
        rest = model(
            input_ids=response_ids.to(device),
            attention_mask=torch.cat([prompt_mask[owner], response_mask], dim=1).to(device),
            position_ids=(lengths[:, None] + torch.arange(response_ids.shape[1])).to(device),
            use_cache=True,
            **{cache_name: cache},
            **rest_names,
        )
        # Response token t (t >= 1) is predicted by the logits at t - 1; only real tokens go through the softmax.
        targets = response_ids[:, 1:].to(device)
        scored = response_mask[:, 1:].to(device).bool()
        logprobs = torch.log_softmax(rest.logits[:, :-1][scored].double(), dim=-1)
        token_logprobs = logprobs.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
        sums.index_add_(0, scored.nonzero()[:, 0], token_logprobs)
    counts_per_row = response_mask.sum(-1)
    return [Score(sums[row].item(), int(counts_per_row[row])) for row in range(len(responses))]


def _forward_parameters(model) -> set[str]:
    """The argument names of the causal LM's forward (the KV cache is "cache" in transformers >= 5.x, before that
    "past_key_values"; ``logits_to_keep`` exists since 4.50)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    return set(inspect.signature(base.forward).parameters)


def _pad(rows: list[list[int]], pad_token_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads token lists to one length; returns (input_ids, attention_mask)."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
