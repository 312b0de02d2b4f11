"""Prompt templates: how an instruction record becomes the text a model is trained and served on.

The same `render` runs in the prepare stage and in serving (the registered model stores the
rendered template), so what the model sees at inference is what it was fine-tuned on.
"""

from __future__ import annotations

from dataclasses import dataclass

from olora.errors import ConfigError

TEMPLATES = ("alpaca", "chat")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Record:
    """One instruction example before rendering."""

    instruction: str
    input: str
    output: str
    origin: str  # file:row or set name:index, for error messages and provenance


def render(record: Record, template: str, tokenizer=None) -> tuple[str, str]:
    """Prompt and response text for one record."""
    if template == "alpaca":
        if record.input.strip():
            prompt = ALPACA_WITH_INPUT.format(instruction=record.instruction.strip(), input=record.input.strip())
        else:
            prompt = ALPACA_NO_INPUT.format(instruction=record.instruction.strip())
        return prompt, record.output.strip()
    content = record.instruction.strip() + ("\n\n" + record.input.strip() if record.input.strip() else "")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.template=chat needs a tokenizer with a chat template; use data.template=alpaca")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return prompt, record.output.strip()


def encode(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int], bool] | None:
    """Token ids and labels with the prompt masked (-100); None when the prompt alone does not fit.

    The response is followed by EOS and truncated to the budget; the flag says whether it was.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_len:
        return None
    room = max_len - len(prompt_ids)
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids, truncated
