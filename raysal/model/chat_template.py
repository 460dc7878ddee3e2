"""A chat template that reads a message's content as a string as well as a list of parts.

LLaVA's templates (the llava-hf processors', raysal's tiny ones) iterate ``message['content']`` as a list of
``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts. Evaluation harnesses pass strings:
lmms-eval's ``llava_hf`` class calls the *tokenizer's* template with ``{"role": "user", "content": "<image>\\n{q}"}``
(the image placeholder inside the text), and on a string the list loop renders nothing: the prompt became
``'USER:  ASSISTANT:'`` with the image and the question gone. The prefix added here rewrites each string content as
one text part before the model's own template runs, so both callers get the same prompt the model was trained
with; the processor expands a ``<image>`` written in the text exactly as one written by an image part.
"""

from __future__ import annotations

MARK = "{#- raysal: string content as one text part -#}"
PREFIX = (
    MARK + "{%- set raysal_ns = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set raysal_ns.messages = raysal_ns.messages + [{'role': m['role'], "
    "'content': [{'type': 'text', 'text': m['content']}]}] -%}"
    "{%- else -%}{%- set raysal_ns.messages = raysal_ns.messages + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = raysal_ns.messages -%}"
)


def accept_string_content(template: str | None) -> str | None:
    """``template`` preceded by the rewrite of string contents (once: a template that has it is returned as is)."""
    if not template or MARK in template:
        return template
    return PREFIX + template
