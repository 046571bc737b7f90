"""Render (instruction, response) with a model's chat template and locate spans by character offsets.

No template-specific token arithmetic: we render text, find the instruction and response *characters* in it,
tokenize with ``return_offsets_mapping`` and select tokens by character overlap. This works for any fast
tokenizer and any template that inserts message content verbatim or trimmed (Llama-3.x applies ``| trim``).

User content is data, never markup: the rendered text is tokenized in segments, template text with its
control tokens parsed, user content (instruction, response prefix, response) with ``split_special_tokens``,
so an instruction containing the literal text ``<|eot_id|>`` or ``<|im_end|>`` cannot end the user turn.
The end-of-turn token is appended by id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A marker no real instruction contains: rendering it shows where the template puts the user's content.
_MARKER = "\u2063LEAFRAY\u2063CONTENT\u2063"


class TemplateError(ValueError):
    pass


@dataclass
class RenderedSample:
    """One tokenized conversation with character-level bookkeeping.

    `input_ids[i]` covers `text[offsets[i][0]:offsets[i][1]]`. `scored_span` is the character range (in
    `text`) whose tokens are scored for saliency; `text[scored_span[0]]` is character `scored_origin` of the
    caller's scored string (non-zero when the template trimmed leading whitespace off the instruction).
    `target_start` is the character where the loss starts: token i is a loss target when its first character
    is >= target_start.
    """

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    scored_span: tuple[int, int]
    target_start: int
    scored_token_idx: list[int] = field(default_factory=list)
    target_mask: list[int] = field(default_factory=list)
    scored_origin: int = 0

    def scored_offsets(self) -> list[tuple[int, int]]:
        """Offsets of the scored tokens relative to the caller's scored string (the original instruction or
        response prefix, untrimmed), clipped to the inserted part, so a token straddling its boundary covers
        only the part inside. Cutting the original string at these offsets removes exactly those tokens."""
        start, end = self.scored_span
        shift = self.scored_origin - start
        return [(min(max(a, start), end) + shift, min(max(b, start), end) + shift)
                for a, b in (self.offsets[i] for i in self.scored_token_idx)]


def render_prompt(tokenizer, instruction: str) -> str:
    msgs = [{"role": "user", "content": instruction}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return instruction + "\n"  # base models without a template: plain concatenation


def locate_instruction(tokenizer, instruction: str) -> tuple[str, int, int, int]:
    """Render the prompt and find the user's content in it: (prompt, start in prompt, length, start in
    `instruction`).

    The template is rendered once with a marker as content: what precedes and follows the marker is the
    template's own text, so the content inserted is what lies between, wherever the template puts it. That
    content must be `instruction` itself or `instruction` with surrounding whitespace trimmed; anything else
    (a template that rewrites content) raises :class:`TemplateError` saying what was inserted.
    """
    if not instruction.strip():
        raise TemplateError("instruction is empty or whitespace only")
    prompt = render_prompt(tokenizer, instruction)
    # The marked render is the same for every instruction: once per tokenizer and template.
    cache = tokenizer.__dict__.setdefault("_leaf_ray_marked", {})
    template = getattr(tokenizer, "chat_template", None)
    marked = cache.get(template)
    if marked is None:
        marked = cache[template] = render_prompt(tokenizer, _MARKER)
    m = marked.find(_MARKER)
    before, after = marked[:m], marked[m + len(_MARKER):]
    if m >= 0 and prompt.startswith(before) and prompt.endswith(after) and len(before) + len(after) <= len(prompt):
        inserted_at, inserted = len(before), prompt[len(before):len(prompt) - len(after)]
    else:  # content-dependent template text around the content: fall back to a search
        inserted_at = -1
        for candidate in (instruction, instruction.strip(), instruction.rstrip(), instruction.lstrip()):
            inserted_at = prompt.rfind(candidate)  # last: a system prompt may precede it
            if inserted_at >= 0:
                inserted = candidate
                break
        if inserted_at < 0:
            raise TemplateError("the chat template's output contains neither the instruction nor the "
                                "instruction with surrounding whitespace trimmed; cannot locate it")
    origin = instruction.find(inserted) if inserted else -1
    if origin < 0 or inserted.strip() != instruction.strip():
        raise TemplateError(f"the chat template changed the instruction beyond trimming surrounding whitespace "
                            f"(inserted {inserted[:60]!r} for {instruction[:60]!r}); cannot locate its characters")
    return prompt, inserted_at, len(inserted), origin


def _segments(i0: int, n: int, prompt_end: int, end: int) -> list[tuple[int, int, bool]]:
    """The pieces of a rendered text, (start, end, is_content): template text, the instruction (content),
    the rest of the prompt's template text, then everything after the prompt (response prefix + response)."""
    return [(0, i0, False), (i0, i0 + n, True), (i0 + n, prompt_end, False), (prompt_end, end, True)]


def _encode_segments(tokenizer, text: str, bounds: list[tuple[int, int, bool]]):
    """Tokenize `text` piece by piece: `bounds` = [(start, end, is_content)], tiling `text`. Content pieces
    are tokenized as plain text (control-token text stays text); template pieces parse their control tokens."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for start, end, is_content in bounds:
        if end <= start:
            continue
        enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=is_content)
        ids += list(enc["input_ids"])
        offsets += [(a + start, b + start) for a, b in enc["offset_mapping"]]
    return ids, offsets


def rendered_lengths(tokenizer, pairs: list[tuple[str, str]]) -> list[int | None]:
    """``len(render(tokenizer, instruction, response).input_ids)`` of every pair, with two batched tokenizer
    calls instead of four calls per pair: :func:`render` tokenizes segment by segment, so its length is the sum
    of the segments' lengths (+ BOS, + end of turn). None where the template cannot be rendered (call
    :func:`render` for the error)."""
    pieces: dict[bool, list[str]] = {False: [], True: []}
    owners: dict[bool, list[int]] = {False: [], True: []}
    template_lengths = tokenizer.__dict__.setdefault("_leaf_ray_template_lengths", {})  # the same few pieces
    fixed = len(_bos(tokenizer)) + (1 if tokenizer.eos_token_id is not None else 0)
    lengths: list[int | None] = []
    for k, (instruction, response) in enumerate(pairs):
        try:
            prompt, i0, n, _ = locate_instruction(tokenizer, instruction)
        except TemplateError:
            lengths.append(None)
            continue
        body = prompt + response
        length = fixed
        for start, end, is_content in _segments(i0, n, len(prompt), len(body)):
            if end <= start:
                continue
            piece = body[start:end]
            if not is_content and piece in template_lengths:
                length += template_lengths[piece]
                continue
            pieces[is_content].append(piece)
            owners[is_content].append(k)
        lengths.append(length)
    for is_content, texts in pieces.items():
        if texts:
            for k, text, n_tokens in zip(owners[is_content], texts, _token_counts(tokenizer, texts, is_content)):
                lengths[k] += n_tokens
                if not is_content and len(template_lengths) < 4096:
                    template_lengths[text] = n_tokens
    return lengths


def _token_counts(tokenizer, texts: list[str], split_special_tokens: bool) -> list[int]:
    """``len(tokenizer(text, add_special_tokens=False, split_special_tokens=...)["input_ids"])`` per text. On a
    fast tokenizer with no truncation or padding set, that call is the Rust ``encode_batch`` plus a conversion
    of every encoding to Python lists (~45% of the time); the counts need only the encodings' lengths."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None or \
            not hasattr(backend, "encode_special_tokens"):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False,
                                              split_special_tokens=split_special_tokens)["input_ids"]]
    backend.encode_special_tokens = split_special_tokens  # what the tokenizer call sets, too
    return [len(encoding) for encoding in backend.encode_batch(texts, add_special_tokens=False)]


def _bos(tokenizer) -> list[int]:
    """A template renders its own BOS; a base model without one still expects its BOS first."""
    if getattr(tokenizer, "chat_template", None) or tokenizer.bos_token_id is None:
        return []
    return [tokenizer.bos_token_id]


def encode_prompt(tokenizer, instruction: str, prefix: str = "") -> list[int]:
    """Token ids of the chat-rendered prompt (+ a response prefix to continue from), for generation: the same
    segment tokenization as :func:`render`, so generation sees the ids detection and training see."""
    prompt, i0, n, _ = locate_instruction(tokenizer, instruction)
    text = prompt + prefix
    ids, _ = _encode_segments(tokenizer, text, _segments(i0, n, len(prompt), len(text)))
    return _bos(tokenizer) + ids


def render(tokenizer, instruction: str, response: str, *, scored: str = "instruction",
           prefix: str = "") -> RenderedSample:
    """Render and tokenize `instruction` -> (`prefix` + `response`).

    scored="instruction": the scored span is the instruction content, the loss covers prefix + response.
    scored="prefix": the scored span is `prefix` (response level), the loss covers `response` only.
    """
    if scored not in ("instruction", "prefix"):
        raise ValueError(f"scored must be 'instruction' or 'prefix', got {scored!r}")
    prompt, i0, n, origin = locate_instruction(tokenizer, instruction)
    body = prompt + prefix + response
    eos, eos_id = tokenizer.eos_token or "", tokenizer.eos_token_id
    text = body + (eos if eos_id is not None else "")
    target_start = len(prompt) + (len(prefix) if scored == "prefix" else 0)
    span = (i0, i0 + n) if scored == "instruction" else (len(prompt), len(prompt) + len(prefix))
    input_ids, offsets = _encode_segments(tokenizer, body, _segments(i0, n, len(prompt), len(body)))
    bos = _bos(tokenizer)
    input_ids, offsets = bos + input_ids, [(0, 0)] * len(bos) + offsets  # zero-width: never scored or a target
    if eos_id is not None:
        input_ids.append(eos_id)
        offsets.append((len(body), len(text)))
    scored_idx = [i for i, (a, b) in enumerate(offsets) if b > a and a < span[1] and b > span[0]]
    target = [1 if a >= target_start and b > a else 0 for (a, b) in offsets]
    # A token straddling the prefix/response boundary (merged across it) must still be predicted from
    # the context; if the boundary is mid-token we count it as a target.
    for i, (a, b) in enumerate(offsets):
        if a < target_start < b:
            target[i] = 1
    return RenderedSample(text=text, input_ids=input_ids, offsets=offsets, scored_span=span,
                          target_start=target_start, scored_token_idx=scored_idx, target_mask=target,
                          scored_origin=origin if scored == "instruction" else 0)
