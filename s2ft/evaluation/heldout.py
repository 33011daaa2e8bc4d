"""Held-out loss: the mean negative log-likelihood of the response tokens of held-out items.

A continuous companion to accuracy (the in-distribution / far-OOD measure of the generalization study). Items are
tokenized exactly as for training (`s2ft.data.tokenize`: prompt, response, EOS; loss on the response and its EOS),
so the number is the training loss on unseen items.
"""

import torch

from s2ft.data.tokenize import IGNORE_INDEX, Collator, tokenize_examples


@torch.inference_mode()
def heldout_loss(model, tokenizer, examples, batch_size: int, max_length: int) -> float:
    """Mean response-token NLL (natural log) over all response tokens of ``examples``, every token weighted equally.

    Args:
        model: A causal LM; evaluated in eval mode (its training mode is restored afterwards).
        tokenizer: Its tokenizer (needs EOS and pad tokens).
        examples: `s2ft.data.Example` items with non-empty outputs.
        batch_size: Items per forward pass.
        max_length: Token limit per item, as in training (longer responses are cut, prompt-only items dropped).

    Returns:
        The mean NLL in nats per token.

    Raises:
        ValueError: No examples, a bad batch size, or no response token to score.
    """
    if not examples:
        raise ValueError("heldout_loss got no examples")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    empty = [example.id for example in examples if not example.output.strip()]
    if empty:
        raise ValueError(f"held-out items need a response to score; these have an empty output: {empty[:5]}")
    dataset = tokenize_examples(examples, tokenizer, max_length)
    collate = Collator(tokenizer)
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {key: value.to(model.device) for key, value in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            scored = targets != IGNORE_INDEX
            logprobs = torch.log_softmax(logits[:, :-1][scored].double(), dim=-1)
            total -= logprobs.gather(-1, targets[scored].unsqueeze(-1)).sum().cpu()
            count += int(scored.sum())
    finally:
        model.train(was_training)
    return (total / count).item()
