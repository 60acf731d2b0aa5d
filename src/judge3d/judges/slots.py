"""Image slots of a judge prompt: where each image stands in the user turn.

``<image1>`` and ``<image2>`` are the two montages compared (A and B); ``<image0>`` is the optional
reference, the input image the meshes were generated from, shown before them. A prompt names
``<image1>`` and ``<image2>`` once each, in that order, optionally with ``<image0>`` once before
``<image1>``; or it names no slot at all, and then the two montages come first, the text after them.

Kept free of torch / transformers (and of hf.py) so the swap protocol and the verdict log can ask a
prompt how many images it shows without loading a model stack.
"""
from __future__ import annotations

REFERENCE_SLOT = "<image0>"
IMAGE_SLOTS = ("<image1>", "<image2>")
ALL_SLOTS = (REFERENCE_SLOT, *IMAGE_SLOTS)


def _named_slots(prompt: str) -> tuple[str, ...]:
    """The slots a prompt names, in prompt order; () for a slot-free prompt. ValueError if malformed."""
    counts = {slot: prompt.count(slot) for slot in ALL_SLOTS}
    if not any(counts.values()):
        return ()
    at = {slot: prompt.find(slot) for slot in ALL_SLOTS}
    ok = (counts[IMAGE_SLOTS[0]] == 1 and counts[IMAGE_SLOTS[1]] == 1 and at[IMAGE_SLOTS[0]] < at[IMAGE_SLOTS[1]]
          and counts[REFERENCE_SLOT] <= 1
          and (counts[REFERENCE_SLOT] == 0 or at[REFERENCE_SLOT] < at[IMAGE_SLOTS[0]]))
    if not ok:
        raise ValueError(
            f"judge prompt {prompt!r}: name each of {IMAGE_SLOTS[0]} and {IMAGE_SLOTS[1]} once, in that order, "
            f"optionally with the reference slot {REFERENCE_SLOT} once before {IMAGE_SLOTS[0]} (or no slot at all, "
            "to show the two images before the text).")
    return tuple(slot for slot in ALL_SLOTS if counts[slot])


def prompt_image_count(prompt: str) -> int:
    """How many images a judge query with this prompt shows: 3 if it names ``<image0>`` (the reference,
    then the two montages), else 2. ValueError for a malformed prompt."""
    return len(_named_slots(prompt)) or 2


def prompt_content(prompt: str) -> list[dict]:
    """Chat content items for a judge prompt: each image at its slot, or the two images first (no slots)."""
    slots = _named_slots(prompt)
    if not slots:
        return [{"type": "image"}, {"type": "image"}, {"type": "text", "text": prompt}]
    content: list[dict] = []
    rest = prompt
    for slot in slots:
        head, rest = rest.split(slot, 1)
        if head:
            content.append({"type": "text", "text": head})
        content.append({"type": "image"})
    if rest:
        content.append({"type": "text", "text": rest})
    return content


def slot_layout(n_images: int) -> str:
    """The query layout a prompt of ``n_images`` images takes, for error messages."""
    return "(reference, first, second)" if n_images == 3 else "(first, second)"
