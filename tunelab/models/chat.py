"""How chat messages become the tokens a model sees — one place for inference and training.

    text = render_chat(tokenizer, messages)     # the model's chat template, assistant turn opened
    ids = end_of_turn_ids(tokenizer)             # what the template puts after an answer (<|im_end|>)
    template_name(tokenizer)                     # "chat template" or "plain text"

A chat model (SmolLM2) is prompted with its own chat template. A pretrained base model (Gemma 3
270M) has none: its prompts are **plain text**, every turn a line with the role and a colon and
the turn's text on the lines after it, the text opened by the tokenizer's bos token where the
tokenizer adds one (Gemma reads garbage without it):

    <bos>system:
    You route support tickets.
    user:
    Route this message: I was charged twice
    assistant:
    billing
    user:
    ...
    assistant:

An answer of a plain-text model ends with a newline (its end-of-turn token), the turn separator
the model has seen in the prompt, and free text stops at the first newline: answers are one line.
The local backend renders prompts and scores labels with these; fine-tuning renders its training
examples and ends each completion with the same end-of-turn tokens, so a fine-tuned model learns to
stop where the backend expects it to.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
_MARKER = "\u2063XYZ\u2063"
PLAIN_END = "\n"  # what ends a turn (and an answer) in plain-text prompts


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def template_name(tokenizer: Any) -> str:
    """How this model's prompts are rendered: "chat template" or "plain text"."""
    return "chat template" if has_template(tokenizer) else "plain text"


def plain_text(messages: list[Message], bos: str = "") -> str:
    """`messages` as plain text (see the module doc), the assistant turn opened."""
    return bos + "".join(f"{m['role']}:\n{m['content']}{PLAIN_END}" for m in messages) + "assistant:\n"


def _bos(tokenizer: Any) -> str:
    """The bos token's text where the tokenizer puts it before a text by default, else ''."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or not tokenizer.bos_token:
        return ""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == bos_id else ""


def render_chat(tokenizer: Any, messages: list[Message]) -> str:
    """The prompt text for `messages`: the chat template with the assistant turn opened, or for a
    tokenizer without one, plain text (see the module doc)."""
    if has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return plain_text(messages, _bos(tokenizer))


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token(s) that end an assistant answer: the special token the chat template puts after
    it (SmolLM2: `<|im_end|>`), else the eos token; for plain-text prompts the newline."""
    if has_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _MARKER}], tokenize=False)
        after = text.split(_MARKER, 1)[1] if _MARKER in text else ""
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if ids and ids[0] in set(tokenizer.all_special_ids):
            return [ids[0]]
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(tokenizer(PLAIN_END, add_special_tokens=False)["input_ids"])
