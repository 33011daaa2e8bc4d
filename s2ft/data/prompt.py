"""The one Alpaca-style prompt template, shared by training and evaluation.

The official S2FT/LLM-Adapters training and evaluation scripts use templates that differ in whitespace; a model is
sensitive to such differences, so here both sides call `build_prompt` and the response follows it directly.
"""

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def build_prompt(instruction: str, input: str = "") -> str:
    """Formats an instruction (and optional input) as the Alpaca prompt; the response is appended right after it.

    Surrounding whitespace of the instruction and input is stripped (several test sets carry stray spaces),
    so the same question always yields the same prompt.

    Args:
        instruction: The task or question; must not be empty.
        input: Optional context; the no-input template is used when it is empty or blank.

    Returns:
        The prompt, ending in "### Response:\\n".
    """
    if not instruction.strip():
        raise ValueError("build_prompt needs a non-empty instruction")
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return PROMPT_NO_INPUT.format(instruction=instruction.strip())
