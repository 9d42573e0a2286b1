"""The profiling deployment: candidates evaluated on mirrored prompts, in the background.

The router mirrors a request here fire-and-forget; ``mirror`` only enqueues (a full queue drops the prompt and
says so), so user traffic never waits on profiling.  A background task runs each queued prompt through every
requested candidate in profile mode (full depth, every exit) and sends the per-token records to the brain, which
folds them into the PHT.  Models are loaded lazily, once, at full depth with all their trained exits.

Its CPU cost is real on a small host - it shares cores with the replicas - which is why only a few percent of
traffic is mirrored and each profile is capped at ``profile_max_tokens`` tokens.

It also scores a sample of *served* chat answers (``quality.online_sample``) against the chat reference - the model
the placements' quality records were measured against answers the same messages, and the score is the overlap of
the two answers - and reports each score to the brain, which replaces a placement's offline chat score with the
online one once it has enough of them (docs/quality.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from helios_ray.serve.config import DEFAULT_GROUP, ServeConfig

log = logging.getLogger("ray.serve")


class Profiler:
    def __init__(self, config: dict[str, Any], brain: Any):
        import torch

        self.cfg = ServeConfig.model_validate(config)
        self.brain = brain
        torch.set_num_threads(1)
        from helios_ray.models.repository import ModelRepository

        self.repo = ModelRepository(extra=self.cfg.models, models_file=self.cfg.models_file)
        self.models: dict[str, Any] = {}
        self.queue: asyncio.Queue[tuple[dict[str, Any], list[str]]] = asyncio.Queue(maxsize=self.cfg.profile_queue)
        self.scores: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=self.cfg.profile_queue)
        self.scored = self.scores_dropped = 0
        self._scorer: asyncio.Task | None = None
        self._reference: Any = None
        from helios_ray.tuning.quality import recorded_reference

        self.reference = recorded_reference(self.repo, self.cfg.candidates)
        self.done = self.dropped = self.failed = 0
        self.busy_seconds = 0.0
        self.active = False
        self._task: asyncio.Task | None = None

    def _model(self, name: str) -> Any:
        m = self.models.get(name)
        if m is None:
            from helios_ray.models.early_exit import load_model

            m = self.models[name] = load_model(name, repo=self.repo, exits="all", threshold=self.cfg.threshold)
        return m

    def _profile(self, item: dict[str, Any], name: str) -> list[dict[str, Any]]:
        from helios_ray.tuning.profiling import profile_prompts

        return profile_prompts(self._model(name), [item], self.cfg.profile_max_tokens)

    async def _worker(self) -> None:
        while True:
            item, names = await self.queue.get()
            self.active = True
            for name in names:
                t0 = time.perf_counter()
                try:
                    records = await asyncio.to_thread(self._profile, item, name)
                    await self.brain.observe_profile.remote(records, group=item.get("group", DEFAULT_GROUP))
                    self.done += 1
                except Exception:
                    self.failed += 1
                    log.exception("helios profiler: profiling %s failed", name)
                self.busy_seconds += time.perf_counter() - t0
            self.active = False

    async def mirror(self, item: dict[str, Any], models: list[str]) -> bool:
        """Enqueue a mirrored prompt; never waits.  Returns False when the queue is full (dropped)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._worker())
        try:
            self.queue.put_nowait((item, models))
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            return False

    def _score(self, item: dict[str, Any]) -> float | None:
        """The chat score of one served answer, as the offline records define it: word-overlap F1 with the
        reference's own answer to the same messages (greedy, at the serving dtype, as long as the records')."""
        from helios_data import Conversation
        from helios_ray.tuning.quality import answer_overlap, chat_answers

        if self._reference is None:
            from helios_ray.models.early_exit import load_model

            self._reference = load_model(self.reference, repo=self.repo, dtype=self.cfg.dtype
                                         if self.cfg.dtype in ("auto", "float32", "bfloat16") else "auto")
        conv = Conversation(id="served", messages=tuple(item["messages"]))
        ref = chat_answers(self._reference, [conv], max_tokens=self.cfg.quality.online_max_tokens, batch=1)
        return answer_overlap(item["text"], ref["served"]) if "served" in ref else None

    async def _score_worker(self) -> None:
        while True:
            item = await self.scores.get()
            t0 = time.perf_counter()
            try:
                score = await asyncio.to_thread(self._score, item)
                if score is not None:
                    await self.brain.observe_quality.remote(item["model"], item["depth"], "chat", score)
                    self.scored += 1
            except Exception:
                self.failed += 1
                log.exception("helios profiler: scoring a served answer failed")
            self.busy_seconds += time.perf_counter() - t0

    async def score_answer(self, item: dict[str, Any]) -> bool:
        """Enqueue a served chat answer ``{messages, text, model, depth, group}`` to be scored under the chat
        reference; never waits (a full queue drops it).  False when dropped or when no reference is known."""
        if self.reference is None:
            return False
        if self._scorer is None or self._scorer.done():
            self._scorer = asyncio.get_running_loop().create_task(self._score_worker())
        try:
            self.scores.put_nowait(item)
            return True
        except asyncio.QueueFull:
            self.scores_dropped += 1
            return False

    async def stats(self) -> dict[str, Any]:
        return {"queued": self.queue.qsize(), "busy": self.active, "profiled": self.done, "dropped": self.dropped,
                "failed": self.failed, "busy_seconds": round(self.busy_seconds, 2), "loaded": sorted(self.models),
                "chat_reference": self.reference, "answers_scored": self.scored,
                "answers_dropped": self.scores_dropped}
