"""Prompt and conversation data for tuning, evaluation and profiling: the server side's import point.

    from helios_ray.data import load_sharegpt, load_humaneval, load_jsonl, render, encode

    convs = load_sharegpt(limit=100, seed=0, split="heldout")   # list[Conversation]
    ids = encode(convs[0], tokenizer)                            # chat template when the model has one

The readers, :class:`Conversation` and the deterministic train/held-out split are re-exported from
:mod:`loadgen.data` (one copy, owned by the load generator); they raise :class:`DatasetError`, which the
``helios-ray`` command prints as one line like a :class:`~helios_ray.errors.HeliosError`.  :func:`render`,
:func:`encode` and :func:`has_chat_template` (tokenizer side) live in :mod:`helios_ray.data.conversation`.
"""

from helios_ray.data.conversation import encode, has_chat_template, render
from loadgen.data import (
    HELDOUT_FRACTION, Conversation, DatasetError, Split, humaneval_path, in_split, iter_json_array, iter_sharegpt,
    load_dataset, load_humaneval, load_jsonl, load_sharegpt, normalize_messages, sharegpt_path, split_of,
)

__all__ = [
    "HELDOUT_FRACTION", "Conversation", "DatasetError", "Split", "encode", "has_chat_template", "humaneval_path",
    "in_split", "iter_json_array", "iter_sharegpt", "load_dataset", "load_humaneval", "load_jsonl", "load_sharegpt",
    "normalize_messages", "render", "sharegpt_path", "split_of",
]
