"""Render (instruction, response) with a model's chat template and locate spans by character offsets.

No template-specific token arithmetic: we render text, find the instruction and response *characters* in it,
tokenize once with ``return_offsets_mapping`` and select tokens by character overlap. This works for any fast
tokenizer and any template that inserts message content verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class TemplateError(ValueError):
    pass


@dataclass
class RenderedSample:
    """One tokenized conversation with character-level bookkeeping.

    `input_ids[i]` covers `text[offsets[i][0]:offsets[i][1]]`. `scored_span` is the character range (in
    `text`) whose tokens are scored for saliency; `target_start` is the character where the loss starts:
    token i is a loss target when its first character is >= target_start.
    """

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    scored_span: tuple[int, int]
    target_start: int
    scored_token_idx: list[int] = field(default_factory=list)
    target_mask: list[int] = field(default_factory=list)


def render_prompt(tokenizer, instruction: str) -> str:
    msgs = [{"role": "user", "content": instruction}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return instruction + "\n"  # base models without a template: plain concatenation


def render(tokenizer, instruction: str, response: str, *, scored: str = "instruction",
           prefix: str = "") -> RenderedSample:
    """Render and tokenize `instruction` -> (`prefix` + `response`).

    scored="instruction": the scored span is the instruction content, the loss covers prefix + response.
    scored="prefix": the scored span is `prefix` (response level), the loss covers `response` only.
    """
    prompt = render_prompt(tokenizer, instruction)
    # The instruction is the last occurrence in the prompt (a system prompt may precede it).
    i0 = prompt.rfind(instruction)
    if i0 < 0 or not instruction:
        raise TemplateError("chat template does not insert the instruction verbatim; cannot locate it")
    eos = tokenizer.eos_token or ""
    text = prompt + prefix + response + eos
    target_start = len(prompt) + (len(prefix) if scored == "prefix" else 0)
    if scored == "instruction":
        span = (i0, i0 + len(instruction))
    elif scored == "prefix":
        span = (len(prompt), len(prompt) + len(prefix))
    else:
        raise ValueError(f"scored must be 'instruction' or 'prefix', got {scored!r}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    scored_idx = [i for i, (a, b) in enumerate(offsets) if b > a and a < span[1] and b > span[0]]
    target = [1 if a >= target_start and b > a else 0 for (a, b) in offsets]
    # A token straddling the prompt/response boundary (merged across it) must still be predicted from
    # the context; if the boundary is mid-token we count it as a target.
    for i, (a, b) in enumerate(offsets):
        if a < target_start < b:
            target[i] = 1
    return RenderedSample(text=text, input_ids=list(enc["input_ids"]), offsets=offsets, scored_span=span,
                          target_start=target_start, scored_token_idx=scored_idx, target_mask=target)
