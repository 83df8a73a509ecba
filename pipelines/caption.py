"""The `caption` flow (deployment `caption/sidecars`): the caption pass (captioners/recaption.py)
over a curated output, as one coarse Prefect task with Ray inside, as `t2i caption` runs it.

The pass is one task: its unit of work, a part, is a Ray task behind the pass's own dispatcher,
and Prefect would only add overhead per part. ``curate/laion`` with ``caption_config`` runs the
same task after curation (``caption_state``). A config or output the pass refuses (a model
folder missing, a set made with other settings) and a stopped pass fail the flow run with the
pass's one-line message; parts that failed fail it naming them, the rest being done.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote

from captioners.recaption import caption_output
from pipelines.curate import ProgressArtifact
from schemas.config import ConfigError
from schemas.recaption import RecaptionConfig, load_recaption_config
from tasks.passes import PassSummary, RunAborted
from tasks.sidecar import PART_MANIFEST, PartResult, list_parts
from tasks.storage import as_store


class _Progress:
    """Parts in the caption set out of the output's parts, after every part: logs and an artifact.
    Counted from the set's manifest, so parts done by an earlier run count as done."""

    def __init__(self, shards: str, cfg: RecaptionConfig):
        self.shards, self.cfg = shards, cfg
        self.bar: ProgressArtifact | None = None  # made at the first part: the pass has checked the output

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = ProgressArtifact("caption-progress", f"parts of {self.shards} in its "
                                        f"{self.cfg.output.name} set", done, total)
        else:
            self.bar.update(done, total)

    def part_done(self, result: PartResult) -> None:
        store = as_store(self.shards, self.cfg.storage)
        total = self.bar.total if self.bar else len(list_parts(store))
        done = len(store.list(f"{self.cfg.output.name}/{PART_MANIFEST}", ".json"))
        self.update(done, total)
        get_run_logger().info("parts %d/%d (%.1f%%) | part %s: %d rows, errors %s", done, total,
                              self.bar.percent(), result.shard_id, result.rows, result.errors or "none")


def summary_markdown(s: PassSummary) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "none"
    rows = [("parts", f"{s.parts_total} (done now {s.parts_done}, done before {s.parts_skipped}, "
                      f"failed {len(s.failed)})"),
            ("rows captioned now", s.rows), ("rows with an error, per stage", errors),
            (f"rows in the {s.set} set", s.set_rows), ("seconds", s.seconds)]
    lines = [f"# Caption pass over {s.out}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if s.failed:
        lines += ["", "## Failed parts", "", *(f"- `{k}`: {v}" for k, v in sorted(s.failed.items()))]
    return "\n".join(lines) + "\n"


@task(name="caption-parts", persist_result=False, cache_policy=NO_CACHE)
def caption_parts(shards: str, cfg: RecaptionConfig) -> State:
    """Every part of ``shards`` not yet in the set; the summary as a Completed state's data."""
    logger = get_run_logger()
    progress = _Progress(shards, cfg)
    try:
        s = caption_output(shards, cfg, progress=progress.part_done)
    except (ConfigError, RunAborted) as exc:  # what the pass refused or why it stopped, in one line
        logger.error("the caption pass %s: %s", "stopped" if isinstance(exc, RunAborted) else "refused", exc)
        return Failed(message=f"the run stopped: {exc}" if isinstance(exc, RunAborted) else str(exc))
    progress.update(s.parts_skipped + s.parts_done, s.parts_total)
    create_markdown_artifact(markdown=summary_markdown(s), key="caption-summary",
                             description=f"caption pass over {s.out}")
    if s.failed:
        why = " | ".join(f"{k}: {v}" for k, v in sorted(s.failed.items()))
        return Failed(message=f"{len(s.failed)} part(s) failed; the rest is done: {why}")  # the summary: its artifact
    return Completed(message=f"captioned {s.parts_done} parts ({s.rows} rows), {s.parts_skipped} done before; "
                             f"the {s.set} set holds {s.set_rows} rows", data=s.to_dict())


def caption_state(shards: str, cfg: RecaptionConfig) -> State:
    """The caption task in the calling flow run; a state (summary as data) for the flow to return.
    A new one: a flow returning its task's state would end with Prefect's "All states completed."."""
    state = caption_parts(shards, quote(cfg), return_state=True)
    if state.is_completed():
        return Completed(message=state.message, data=state.result())
    return Failed(message=state.message)  # no data: Prefect raises a TypeError for a Failed state's dict


@flow(name="caption", log_prints=True)
def caption(shards: str, config: str) -> State:
    """Caption the parts of ``shards`` (a curated output) with the caption config ``config``
    (configs/recaption-*.yaml); the result is the pass's summary (a dict). Holds the output's
    lock for the pass, so it refuses while a curation or another pass works on ``shards``."""
    try:
        cfg = load_recaption_config(config)
    except ConfigError as exc:
        return Failed(message=str(exc))
    return caption_state(shards, cfg)

