"""Render a template for a causal LM, whose answer slot is the next token after the text.

A masked LM fills ``{mask}`` anywhere; a causal LM (vLLM, OpenAI) can only predict what comes next, so
``{mask}`` must end the template and the label word is scored as the first generated token.
"""

from __future__ import annotations

import re

from bbt_client.errors import ConfigError
from bbt_client.protocol import MASK_SLOT, TEXT_A_SLOT, TEXT_B_SLOT, TEXT_SLOT, ends_with_mask

_SLOTS = re.compile("|".join(re.escape(s) for s in (TEXT_SLOT, TEXT_A_SLOT, TEXT_B_SLOT)))


def check_causal_template(template: str) -> None:
    if not ends_with_mask(template):
        raise ConfigError(
            f"template {template!r} does not end with {MASK_SLOT}: a causal (next-token) endpoint can only score "
            "the word that follows the text; move {mask} to the end, e.g. '{text} It was {mask}'")
    if TEXT_SLOT not in template and TEXT_A_SLOT not in template:
        raise ConfigError(f"template {template!r} needs {TEXT_SLOT}")


def prefix_before_mask(template: str, text: str, text_b: str | None = None) -> str:
    """The text the model reads before the answer, with trailing spaces removed: the label word carries
    its own leading space (BPE tokenizers encode " great" as one token)."""
    check_causal_template(template)
    head = template[: template.index(MASK_SLOT)]
    if TEXT_B_SLOT in head and text_b is None:
        raise ConfigError("template has {text_b} but the task gives no text pairs")
    values = {TEXT_SLOT: text, TEXT_A_SLOT: text, TEXT_B_SLOT: text_b}
    # one pass, so a text that itself contains "{text_b}" is not substituted again
    return _SLOTS.sub(lambda m: values[m.group(0)], head).rstrip()


def label_text(word: str) -> str:
    """How a label word appears after the prefix: one leading space (unless the word starts with one)."""
    return word if word.startswith(" ") else " " + word
