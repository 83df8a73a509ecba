"""The caption pass: recaption (VLM, English) then translate (EN -> ZH), as a sidecar pass over a
curated output's parts (tasks/sidecar.py). ``t2i caption``, the ``caption`` flow and the
``curate/laion`` flow all call ``caption_output``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from captioners.stages import RecaptionParams, RecaptionStage, TranslateParams, TranslateStage
from schemas.recaption import RESUMABLE, RecaptionConfig
from tasks.actors import Deadline, Resources
from tasks.passes import PassSummary, run_pass
from tasks.sidecar import PartResult, SidecarPass, StagePlan


def caption_pass(cfg: RecaptionConfig) -> SidecarPass:
    """The stages a caption config asks for, with their pools' resources and batch sizes."""
    plans = []

    def plan(stage: RecaptionStage | TranslateStage) -> StagePlan:
        r = cfg.resources(stage.name)
        deadline = Deadline(r.deadline_s, r.deadline_per_row_s)
        resources = Resources(r.cpus_per_actor, r.gpus_per_actor, r.actors, deadline)
        return StagePlan(stage, resources, r.request_rows, r.batch_size)

    plans.append(plan(RecaptionStage(RecaptionParams(captioner=cfg.captioner, decode=cfg.decode))))
    if cfg.translator is not None:
        plans.append(plan(TranslateStage(TranslateParams(translator=cfg.translator, protect=cfg.protect))))
    definition = {k: v for k, v in cfg.set_definition().items() if k not in RESUMABLE}
    return SidecarPass(cfg.output.name, tuple(plans), definition, run=cfg.run, decode=cfg.decode,
                       storage=cfg.storage)


def caption_output(shards: str | Path, cfg: RecaptionConfig, *, use_ray: bool = True,
                   progress: Callable[[PartResult], None] | None = None) -> PassSummary:
    """Caption every part of a curated output not yet in the caption set."""
    return run_pass(shards, caption_pass(cfg), use_ray=use_ray, command="t2i caption", progress=progress)
