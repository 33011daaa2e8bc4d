"""Held-out loss: the mean negative log-likelihood of the response tokens of held-out items.

A continuous companion to accuracy (the in-distribution / far-OOD measure of the generalization study). Items are
tokenized exactly as for training (`s2ft.data.tokenize`: prompt, response, EOS; loss on the response and its EOS),
so the number is the training loss on unseen items.
"""

import logging

import torch

from s2ft.checks import require_positive_int
from s2ft.data.records import DataError
from s2ft.data.tokenize import IGNORE_INDEX, Collator, check_special_tokens, encode_batch, has_response

log = logging.getLogger(__name__)


def heldout_item_losses(
    model, tokenizer, examples, batch_size: int, max_length: int, template: str = "alpaca"
) -> list[dict]:
    """Summed response-token NLL (natural log) and token count of every held-out item, for item-level statistics.

    Args:
        model: A causal LM; evaluated in eval mode (its training mode is restored afterwards).
        tokenizer: Its tokenizer (needs EOS and pad tokens).
        examples: `s2ft.data.Example` items with non-empty outputs.
        batch_size: Items per forward pass.
        max_length: Token limit per item, as in training (longer responses are cut, prompt-only items dropped).
        template: The prompt template of the run, "alpaca" or "chat".

    Returns:
        ``{"id", "nll", "tokens"}`` per scored item, in the order of ``examples``.

    Raises:
        ValueError: No examples or a bad batch size; DataError: no response token to score (max_length too short),
            or items holding a special token of the tokenizer (`s2ft.data.tokenize.special_token_problems`).
    """
    return adapter_item_losses(model, tokenizer, examples, batch_size, max_length, {None: template})[None]


@torch.inference_mode()
def adapter_item_losses(
    model, tokenizer, examples, batch_size: int, max_length: int, templates: dict[str | None, str]
) -> dict[str | None, list[dict]]:
    """`heldout_item_losses` of every adapter of a mixed-adapter model (`s2ft.load_adapters`) in one pass.

    Each item is scored once per adapter, in that adapter's prompt template; the rows of one item under the different
    adapters are neighbours in a batch, each run with its own adapter (``adapter_names``).

    Args:
        templates: Adapter name -> its prompt template; ``{None: template}`` scores the model as it is.
        model, tokenizer, examples, batch_size, max_length: As for `heldout_item_losses`.

    Returns:
        Adapter name -> ``{"id", "nll", "tokens"}`` per scored item, in the order of ``examples``.
    """
    if not examples:
        raise ValueError("heldout_loss got no examples")
    require_positive_int("batch_size", batch_size)
    empty = [example.id for example in examples if not example.output.strip()]
    if empty:
        raise ValueError(f"held-out items need a response to score; these have an empty output: {empty[:5]}")
    check_special_tokens({"the held-out items": examples}, tokenizer)
    fields = ([e.instruction for e in examples], [e.input for e in examples], [e.output for e in examples])
    encoded = {name: encode_batch(*fields, tokenizer, max_length, template) for name, template in templates.items()}
    # Tokenized as training tokenizes; an item whose prompt fills max_length has no response token and is left out.
    rows = [
        (name, {"id": example.id, **{key: values[i] for key, values in columns.items()}})
        for i, example in enumerate(examples)
        for name, columns in encoded.items()
        if has_response(columns["labels"][i])
    ]
    if not rows:
        # A user's error, and with eval.before=false found only after training: a message, not a traceback.
        raise DataError(
            f"every held-out prompt is at least max_length={max_length} tokens long, leaving no response token to "
            "score: raise data.max_length"
        )
    for name in templates:
        dropped = len(examples) - sum(1 for row_name, _ in rows if row_name == name)
        if dropped:  # as tokenize_examples reports it for training data
            log.warning("dropped %d held-out items whose prompt fills max_length=%d", dropped, max_length)
    mixed = list(templates) != [None]
    collate = Collator(tokenizer)
    was_training = model.training
    model.eval()
    items = {name: [] for name in templates}
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = {key: value.to(model.device) for key, value in collate([row for _, row in chunk]).items()}
            names = {"adapter_names": [name for name, _ in chunk]} if mixed else {}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **names).logits
            targets = batch["labels"][:, 1:]
            scored = targets != IGNORE_INDEX
            # Only the scored positions go through the softmax (the rest would be (items x length x vocab) doubles).
            logprobs = torch.log_softmax(logits[:, :-1][scored].double(), dim=-1)
            token_nll = -logprobs.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
            per_row = torch.zeros(len(chunk), dtype=torch.float64, device=token_nll.device)
            per_row.index_add_(0, scored.nonzero()[:, 0], token_nll)
            for (name, row), nll, count in zip(chunk, per_row.tolist(), scored.sum(-1).tolist(), strict=True):
                items[name].append({"id": row["id"], "nll": nll, "tokens": count})
    finally:
        model.train(was_training)
    return items


def heldout_loss(model, tokenizer, examples, batch_size: int, max_length: int, template: str = "alpaca") -> float:
    """Mean response-token NLL (natural log) over all response tokens of ``examples``, every token weighted equally.

    Same arguments and errors as `heldout_item_losses`; returns nats per token.
    """
    return mean_token_loss(heldout_item_losses(model, tokenizer, examples, batch_size, max_length, template))


def mean_token_loss(items: list[dict]) -> float:
    """The token-weighted mean NLL of `heldout_item_losses` items."""
    return sum(item["nll"] for item in items) / sum(item["tokens"] for item in items)
