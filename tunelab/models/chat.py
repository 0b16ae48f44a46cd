"""How chat messages become the tokens a model sees — one place for inference and training.

    text = render_chat(tokenizer, messages)     # the model's chat template, assistant turn opened
    ids = end_of_turn_ids(tokenizer)             # what the template puts after an answer (<|im_end|>)

A tokenizer without a chat template (a pretrained base such as Gemma 3 270M) gets plain
`role: content` lines and `assistant: `; its answers end with the eos token. The local backend
renders prompts and scores labels with these; fine-tuning renders its training examples and ends
each completion with the same end-of-turn tokens, so a fine-tuned model learns to stop where the
backend expects it to.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
_MARKER = "\u2063XYZ\u2063"


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: list[Message]) -> str:
    """The prompt text for `messages`: the chat template with the assistant turn opened, or for a
    tokenizer without one, plain `role: content` lines and `assistant: `."""
    if has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token(s) that end an assistant answer: the special token the chat template puts after
    it (SmolLM2: `<|im_end|>`), else the tokenizer's eos token (none: [])."""
    if has_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _MARKER}], tokenize=False)
        after = text.split(_MARKER, 1)[1] if _MARKER in text else ""
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if ids and ids[0] in set(tokenizer.all_special_ids):
            return [ids[0]]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
