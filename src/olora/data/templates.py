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


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template in rendered form: the exact text recipe a model is fine-tuned on.

    prepare writes it beside the data (`prompt_template.json`), train copies it into the adapter,
    and the registered model stores it, so serving renders prompts with what training used even
    after this module's templates or the tokenizer's chat template change.
    """

    kind: str
    """alpaca | chat."""
    with_input: str = ""
    """alpaca: the format string for records with an input ({instruction}, {input})."""
    no_input: str = ""
    """alpaca: the format string for records without one ({instruction})."""
    chat_template: str = ""
    """chat: the tokenizer's Jinja chat template, verbatim."""
    stop: tuple[str, ...] = ()
    """Text that ends a response besides EOS (the template's next section marker)."""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "with_input": self.with_input, "no_input": self.no_input,
                "chat_template": self.chat_template, "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, values: dict) -> "PromptTemplate":
        if values.get("kind") not in TEMPLATES:
            raise ConfigError(f"prompt template kind {values.get('kind')!r} is not one of {', '.join(TEMPLATES)}")
        return cls(values["kind"], values.get("with_input", ""), values.get("no_input", ""),
                   values.get("chat_template", ""), tuple(values.get("stop", ())))


def resolve_template(kind: str, tokenizer=None) -> PromptTemplate:
    """The rendered template for `data.template` (chat takes the tokenizer's chat template)."""
    if kind == "alpaca":
        return PromptTemplate("alpaca", ALPACA_WITH_INPUT, ALPACA_NO_INPUT, stop=("\n### ",))
    if kind == "chat":
        chat = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if not chat or not isinstance(chat, str):
            raise ConfigError("data.template=chat needs a tokenizer with a chat template; use data.template=alpaca")
        return PromptTemplate("chat", chat_template=chat)
    raise ConfigError(f"data.template={kind!r} is not allowed; choose one of: {', '.join(TEMPLATES)}")


def render_prompt(template: PromptTemplate, instruction: str, input: str = "", tokenizer=None) -> str:
    """The prompt text for one instruction (and optional input): the one function prepare and serving share."""
    instruction, input = instruction.strip(), (input or "").strip()
    if template.kind == "alpaca":
        if input:
            return template.with_input.format(instruction=instruction, input=input)
        return template.no_input.format(instruction=instruction)
    if tokenizer is None:
        raise ConfigError("a chat prompt template needs the tokenizer to render")
    content = instruction + ("\n\n" + input if input else "")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], chat_template=template.chat_template, tokenize=False,
        add_generation_prompt=True,
    )


def render(record: Record, template: PromptTemplate | str, tokenizer=None) -> tuple[str, str]:
    """Prompt and response text for one record."""
    if isinstance(template, str):
        template = resolve_template(template, tokenizer)
    return render_prompt(template, record.instruction, record.input, tokenizer), record.output.strip()


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
