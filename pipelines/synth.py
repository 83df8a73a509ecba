"""The `synth` flow (deployment `synth/words`): synthetic Chinese text images (synth_text/pipeline.py)
as one coarse Prefect task with Ray inside, as `t2i synth` runs it.

Its shards (word ranges) are the curation runner's units, on its dispatcher, so a killed flow run
resumes like a curation; the result is the run's summary with the OCR pass rates per font and
layout, also as a markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote

from pipelines.curate import ProgressArtifact
from schemas.config import ConfigError, CurateConfig
from synth_text.pipeline import pass_rates, synth_config, synthesize
from tasks.runner import RunAborted, RunConfigMismatch


def rates_markdown(out: str, rates: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"# Synthetic text: OCR pass rates of {out}"]
    for by, table in rates.items():
        lines += ["", f"## per {by}", "", f"| {by} | images | kept | pass rate |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {r['images']} | {r['kept']} | {r['pass_rate']:.1%} |" for name, r in table.items()]
    return "\n".join(lines) + "\n"


@task(name="render-words", persist_result=False, cache_policy=NO_CACHE)
def render_words(out: str, cfg: CurateConfig) -> State:
    logger = get_run_logger()
    bar: list[ProgressArtifact] = []

    def progress(result: Any, summary: Any) -> None:
        if not bar:
            bar.append(ProgressArtifact("synth-progress", "word shards done", summary.shards_skipped,
                                        summary.shards_total))
        if result is not None:
            bar[0].update(bar[0].done + 1)
            logger.info("shard %s: kept %d, rejected %d", result.shard_id, result.kept, result.rejected)

    try:
        summary = synthesize(out, cfg, progress=progress)
    except (ConfigError, RunAborted, RunConfigMismatch) as exc:
        return Failed(message=str(exc))
    rates = pass_rates(out, cfg.storage)
    create_markdown_artifact(markdown=rates_markdown(out, rates), key="synth-pass-rates",
                             description=f"OCR pass rates of {out}")
    if summary.failed:
        why = " | ".join(f"{k}: {v}" for k, v in sorted(summary.failed.items()))
        return Failed(message=f"{len(summary.failed)} shard(s) failed; the rest is done: {why}")
    return Completed(message=f"kept {summary.output_kept}, rejected {summary.output_rejected}",
                     data={**summary.to_dict(), "pass_rates": rates})


@flow(name="synth", log_prints=True)
def synth(out: str, words: int | None = None, per_word: int | None = None, seed: int | None = None,
          config: str | None = None) -> State:
    """Render the top ``words`` words (``per_word`` images each) into ``out`` and keep what OCR reads back."""
    try:
        cfg = synth_config(config, words=words, per_word=per_word, seed=seed)
    except ConfigError as exc:
        return Failed(message=str(exc))
    state = render_words(out, quote(cfg), return_state=True)
    if state.is_completed():
        return Completed(message=state.message, data=state.result())
    return Failed(message=state.message)
