"""Prompt templates: how an instruction record or a conversation becomes the text a model is trained and served on.

The same `render` runs in the prepare stage and in serving (the registered model stores the
rendered template), so what the model sees at inference is what it was fine-tuned on.

Conversations (`data.format: messages | sharegpt`) render through a chat template into segments
that alternate between text the model reads (system and user turns, the template's markup) and
text it learns to write (each assistant turn with its end-of-turn marker); `encode_segments`
tokenizes them so that the loss covers exactly the assistant turns, every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from olora.errors import ConfigError

TEMPLATES = ("alpaca", "chat")
ROLES = ("system", "user", "assistant")
SHAREGPT_NAMES = ("system", "human", "gpt")  # ShareGPT's own role names, for messages
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# Named chat templates (`data.chat_template`), for tokenizers that have none or to override the tokenizer's.
NAMED_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}

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
    messages: tuple[tuple[str, str], ...] = ()
    """A conversation instead of instruction/input/output: (role, content) turns, roles system/user/assistant."""


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


def _end_of_turn(chat: str, tokenizer) -> tuple[str, ...]:
    """The text a chat template puts after an assistant turn (e.g. `<|im_end|>`): where a served answer stops."""
    marker = "\x00olora-end\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         chat_template=chat, tokenize=False)
    after = text.split(marker, 1)[1].strip() if marker in text else ""
    return (after,) if after else ()


def resolve_template(kind: str, tokenizer=None, named: str = "") -> PromptTemplate:
    """The rendered template for `data.template`: chat takes the named template if given, else the tokenizer's."""
    if kind == "alpaca":
        return PromptTemplate("alpaca", ALPACA_WITH_INPUT, ALPACA_NO_INPUT, stop=("\n### ",))
    if kind == "chat":
        if named and named not in NAMED_CHAT_TEMPLATES:
            raise ConfigError(f"data.chat_template={named!r} is not a named template; choose one of "
                              f"{', '.join(NAMED_CHAT_TEMPLATES)}, or leave it empty for the tokenizer's own")
        chat = NAMED_CHAT_TEMPLATES[named] if named else getattr(tokenizer, "chat_template", None)
        if not chat or not isinstance(chat, str):
            raise ConfigError(
                "data.template=chat needs a chat template: this tokenizer has none; set data.chat_template to a named "
                f"template ({', '.join(NAMED_CHAT_TEMPLATES)}) or use data.template=alpaca"
            )
        return PromptTemplate("chat", chat_template=chat, stop=_end_of_turn(chat, tokenizer))
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


def check_conversation(messages: tuple[tuple[str, str], ...], origin: str, allowed: str = "") -> str | None:
    """What is wrong with a conversation (None when nothing): roles, empty turns, system placement, the last turn.

    `allowed`: the role names an unknown-role message lists (the data format's own; default ROLES).
    """
    if not messages:
        return f"{origin}: the conversation has no turns"
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            return f"{origin}: turn {i} has unknown role {role!r}; allowed: {allowed or ', '.join(ROLES)}"
        if not content.strip():
            return f"{origin}: turn {i} ({role}) has empty content"
        if role == "system" and i > 0:
            return f"{origin}: turn {i} is a system turn; a system turn may only open the conversation"
    if messages[-1][0] != "assistant":
        return f"{origin}: the conversation ends with a {messages[-1][0]} turn; it must end with an assistant turn"
    first = next(role for role, _ in messages if role != "system")
    if first != "user":
        return f"{origin}: the first turn after the system prompt is {first!r}; it must be a user turn"
    return None


def render_conversation(template: PromptTemplate, messages: tuple[tuple[str, str], ...], tokenizer) -> list[tuple[str, bool]]:
    """A conversation as (text, trainable) segments whose concatenation is the chat template's rendering.

    An assistant turn's segment is what the template writes after the generation prompt up to the end
    of that turn (its content and end-of-turn marker): exactly what the served model must produce.
    """
    if template.kind != "chat":
        raise ConfigError("conversations render through a chat template; set data.template=chat")

    def text(turns, generation: bool) -> str:
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], chat_template=template.chat_template,
                                             tokenize=False, add_generation_prompt=generation)

    full = text(messages, False)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        start, end = len(text(messages[:i], True)), len(text(messages[: i + 1], False))
        if not (full.startswith(text(messages[:i], True)) and full.startswith(text(messages[: i + 1], False)) and done <= start < end):
            raise ConfigError(
                f"the chat template does not render turn {i} as a prefix of the whole conversation, so the assistant "
                "turns cannot be located for the loss mask; use a template that renders turn by turn "
                f"(e.g. data.chat_template: {', '.join(NAMED_CHAT_TEMPLATES)})"
            )
        if start > done:
            segments.append((full[done:start], False))
        segments.append((full[start:end], True))
        done = end
    if done < len(full):
        segments.append((full[done:], False))
    return segments


def encode_segments(tokenizer, segments: list[tuple[str, bool]], max_len: int) -> tuple[list[int], list[int], bool] | None:
    """Token ids and labels where only trainable segments count; None when no trainable token fits in `max_len`.

    Each segment is tokenized on its own (the first with the tokenizer's special tokens, as serving
    tokenizes a prompt), so every label boundary is a segment boundary; longer sequences are cut at
    `max_len` and the flag says so.
    """
    encoded = encode_conversation(tokenizer, segments, max_len)
    return None if encoded is None else encoded[:3]


def encode_conversation(tokenizer, segments: list[tuple[str, bool]],
                        max_len: int) -> tuple[list[int], list[int], bool, int] | None:
    """`encode_segments` plus how many trainable segments (assistant turns) keep a token in the loss after the cut."""
    ids: list[int] = []
    labels: list[int] = []
    in_loss = 0
    for k, (text, trainable) in enumerate(segments):
        part = tokenizer(text, add_special_tokens=(k == 0))["input_ids"]
        in_loss += int(trainable and bool(part) and len(ids) < max_len)
        ids += part
        labels += part if trainable else [-100] * len(part)
    truncated = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == -100 for label in labels):
        return None
    return ids, labels, truncated, in_loss


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
