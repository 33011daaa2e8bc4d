"""The prompt templates, shared by training, evaluation and held-out losses.

The official S2FT/LLM-Adapters training and evaluation scripts use templates that differ in whitespace; a model is
sensitive to such differences, so here every side calls `build_prompt` and the response follows it directly.

Two templates (``data.template``):

- ``alpaca``: the paper's Alpaca prompt (below), what the paper's configs train and evaluate with.
- ``chat``: the tokenizer's own chat template with one user turn (the instruction, then the input after a blank line)
  and the generation prompt of the assistant turn, what an Instruct model was tuned on. The response follows it and
  ends with the tokenizer's EOS, as in the Alpaca case (for SmolLM2-Instruct the EOS is ``<|im_end|>``, the end of
  an assistant turn).
"""

from s2ft.errors import UserError

TEMPLATES = ("alpaca", "chat")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class PromptTemplateError(UserError, ValueError):
    """An unknown template, or the chat template with a tokenizer that has none."""


def check_template(template: str, tokenizer=None) -> None:
    """Raises PromptTemplateError for an unknown template or ``chat`` with a tokenizer without a chat template."""
    if template not in TEMPLATES:
        raise PromptTemplateError(f"unknown prompt template {template!r}; use data.template=alpaca or chat")
    if template == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise PromptTemplateError(
            "data.template=chat needs a tokenizer with a chat template, and this model's has none; "
            "use data.template=alpaca"
        )


def build_prompt(instruction: str, input: str = "", template: str = "alpaca", tokenizer=None) -> str:
    """Formats an instruction (and optional input) as a prompt; the response is appended right after it.

    Surrounding whitespace of the instruction and input is stripped (several test sets carry stray spaces),
    so the same question always yields the same prompt.

    Args:
        instruction: The task or question; must not be empty.
        input: Optional context; the Alpaca no-input template is used when it is empty or blank.
        template: "alpaca" or "chat" (see the module docstring).
        tokenizer: The model's tokenizer (needed by "chat").

    Returns:
        The prompt: ending in "### Response:\\n" (alpaca) or the chat template's assistant header (chat).

    Raises:
        ValueError: An empty instruction; PromptTemplateError: an unknown template, or chat without a chat template.
    """
    if not instruction.strip():
        raise ValueError("build_prompt needs a non-empty instruction")
    check_template(template, tokenizer)
    if template == "chat":
        if tokenizer is None:
            raise PromptTemplateError("the chat template is the tokenizer's: pass the tokenizer to build_prompt")
        content = instruction.strip() + (f"\n\n{input.strip()}" if input.strip() else "")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return _without_added_bos(prompt, tokenizer)
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return PROMPT_NO_INPUT.format(instruction=instruction.strip())


def _without_added_bos(prompt: str, tokenizer) -> str:
    # A chat template that writes the BOS itself, with a tokenizer that also adds one, would give two BOS tokens.
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return prompt[len(bos) :]
    return prompt
