"""The `t2i` command. Thin: it parses arguments and calls the functions the flows call."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from schemas.config import ConfigError, load_config
from tasks.sources import SourceError


class _ProgressBar:
    """A tqdm bar on stderr, drawn from the moment the run starts its work (not before, so a run
    refused at start prints only its error line)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, result, summary) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=summary.shards_total, initial=summary.shards_skipped, unit="shard",
                            dynamic_ncols=True, file=sys.stderr)
        if result is not None:
            self.bar.update(1)
            self.bar.set_postfix(kept=summary.kept, rejected=summary.rejected, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_run(args: argparse.Namespace, mode: str) -> int:
    from tasks.runner import run

    cfg = load_config(args.config)
    if args.workers:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"workers": args.workers})})
    bar = _ProgressBar()
    try:
        summary = run(args.source, args.out, cfg, mode=mode, progress=bar, use_ray=not args.no_ray)
    finally:
        bar.close()
    _print(json.dumps(summary.to_dict(), indent=1))
    return 1 if summary.failed else 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from tasks.stats import compute_stats, format_stats
    from tasks.storage import is_remote, open_store

    if not is_remote(args.out) and not Path(args.out).is_dir():
        print(f"error: no such output folder: {args.out}", file=sys.stderr)
        return 2
    store = open_store(args.out)  # on an object store: endpoint and keys from the environment / ~/.aws
    store.check()
    if not store.exists("_run.json"):
        print(f"error: {args.out} is not a t2i curate or analyze output (it has no _run.json)", file=sys.stderr)
        return 2
    stats = compute_stats(args.out)
    _print(json.dumps(stats, indent=1, default=str) if args.json else format_stats(stats))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tasks.report import NotAnOutput, write_report
    from tasks.storage import is_remote

    if not is_remote(args.out) and not Path(args.out).is_dir():
        print(f"error: no such output folder: {args.out}", file=sys.stderr)
        return 2
    try:
        _print(write_report(args.out))  # on an object store: endpoint and keys from the environment / ~/.aws
    except NotAnOutput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


DEFAULT_CAPTION_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "recaption-cogvlm.yaml"


def _cmd_caption(args: argparse.Namespace) -> int:
    from captioners.recaption import caption_output
    from schemas.recaption import load_recaption_config

    cfg = load_recaption_config(args.config or DEFAULT_CAPTION_CONFIG)
    if args.workers:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"workers": args.workers})})
    from tqdm import tqdm

    with tqdm(unit="part", dynamic_ncols=True, file=sys.stderr) as bar:
        summary = caption_output(args.shards, cfg, use_ray=not args.no_ray,
                                 progress=lambda r: bar.update(1) or bar.set_postfix(rows=r.rows, refresh=False))
    _print(json.dumps(summary.to_dict(), indent=1))
    return 1 if summary.failed else 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from synth_text.pipeline import pass_rates, synth_config, synthesize

    cfg = synth_config(args.config, words=args.words, per_word=args.per_word, seed=args.seed)
    if args.workers:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"workers": args.workers})})
    bar = _ProgressBar()
    try:
        summary = synthesize(args.out, cfg, use_ray=not args.no_ray, progress=bar)
    finally:
        bar.close()
    _print(json.dumps({**summary.to_dict(), "pass_rates": pass_rates(args.out, cfg.storage)}, indent=1))
    return 1 if summary.failed else 0


def _cmd_tiny_models(args: argparse.Namespace) -> int:
    from captioners.tiny import build_tiny_models

    _print(json.dumps({k: str(v) for k, v in build_tiny_models(Path(args.dir)).items()}, indent=1))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from pipelines.stack import up

    stack = up(port=args.port)
    _print(f"Prefect UI:  {stack.ui_url}")
    _print(f"in another shell:  export PREFECT_API_URL={stack.api_url}")
    _print("  prefect deployment run curate/laion --param source=PATH --param out=DIR")
    return 0


def _cmd_down(_args: argparse.Namespace) -> int:
    from pipelines.stack import down

    down()
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pipelines.train import train_overrides
    from trainer.config import load_train_config
    from trainer.distributed import run_training

    overrides = train_overrides(args.shards, args.stage, args.preset, args.steps, args.workers)
    cfg = load_train_config(args.config, **overrides)
    try:
        result = run_training(cfg, args.out)
    except (ValueError, OSError) as exc:  # a selection with no rows, a model folder that will not load, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print(json.dumps(result.__dict__, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i", description="Curate image-text pairs for text-to-image training.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("curate", "apply the config's rules: kept rows to shards/, the rest to rejects/"),
                            ("analyze", "compute every signal, apply no rule, to choose thresholds")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--source", required=True,
                       help="webdataset tars, parquet files, or a folder of images (a local path, s3:// or gs://)")
        p.add_argument("--out", required=True,
                       help="output folder or s3:// / gs:// prefix (shards/, rejects/, _manifest/)")
        p.add_argument("--config", help="YAML config (defaults apply where absent)")
        p.add_argument("--workers", type=int, help="override run.workers")
        p.add_argument("--no-ray", action="store_true", help="process in this process, one shard at a time")
        p.set_defaults(func=lambda a, mode=name: _cmd_run(a, mode))
    p = sub.add_parser("caption",
                       help="machine captions (a VLM in English, then Chinese): a sidecar set beside shards/")
    p.add_argument("--shards", required=True, help="a `t2i curate` output (local folder, s3:// or gs://)")
    p.add_argument("--config", help="caption YAML (configs/recaption-*.yaml); default: configs/recaption-cogvlm.yaml")
    p.add_argument("--workers", type=int, help="override run.workers (parts in flight)")
    p.add_argument("--no-ray", action="store_true", help="run the models in this process, one part at a time")
    p.set_defaults(func=_cmd_caption)
    p = sub.add_parser("synth", help="images of the most frequent Chinese words, rendered and read back by OCR")
    p.add_argument("--out", required=True, help="output folder or s3:// / gs:// prefix (a curated output's layout)")
    p.add_argument("--words", type=int, help="the top N words (default 50000, or the config's synth.words)")
    p.add_argument("--per-word", type=int, help="images per word (default 1)")
    p.add_argument("--seed", type=int, help="the seed every choice follows from (default 0)")
    p.add_argument("--config", help="synth YAML: synth:, ocr:, output:, run:, storage: sections")
    p.add_argument("--workers", type=int, help="override run.workers")
    p.add_argument("--no-ray", action="store_true", help="render in this process, one shard at a time")
    p.set_defaults(func=_cmd_synth)
    from t2i.grade_cli import add_parser as add_grade

    add_grade(sub, _print)
    p = sub.add_parser("tiny-models", help="build the tiny random models that configs/recaption-tiny.yaml names")
    p.add_argument("dir", nargs="?", default="tiny-models")
    p.set_defaults(func=_cmd_tiny_models)
    p = sub.add_parser("train", help="train a Kolors-architecture model on curated shards; export a KolorsPipeline")
    p.add_argument("--shards", nargs="+", help="curate/analyze output folders (or parquet files); else the config's")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, train-log.jsonl, model/ (resumes)")
    p.add_argument("--stage", choices=("concept", "quality"), help="stage 1 (concept) or 2 (quality)")
    p.add_argument("--config", help="YAML train config (stage defaults apply where absent)")
    p.add_argument("--preset", choices=("tiny",), help="small random models, built offline (tests, dry runs)")
    p.add_argument("--steps", type=int, help="optimizer steps in total")
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP); 1 trains in this process")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("up", help="start a local Prefect server, work pool and worker; deploy prefect.yaml")
    p.add_argument("--port", type=int, default=4200)
    p.set_defaults(func=_cmd_up)
    p = sub.add_parser("down", help="stop what `t2i up` started")
    p.set_defaults(func=_cmd_down)
    p = sub.add_parser("stats", help="DuckDB summary of an output folder")
    p.add_argument("out", help="output folder or s3:// prefix")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_stats)
    p = sub.add_parser("report", help="DIR/report.html: what was kept and what each rule removed, with thumbnails")
    p.add_argument("out", help="output folder or s3:// prefix")
    p.set_defaults(func=_cmd_report)
    return parser


# The command's own output. Everything else that writes to file descriptor 1 (Ray's C++
# core, a library's print) is sent to stderr instead, so `--json` output parses.
_STDOUT = None


def _print(text: str) -> None:
    print(text, file=_STDOUT or sys.stdout, flush=True)


def _stdout_to_stderr() -> None:
    global _STDOUT
    _STDOUT = os.fdopen(os.dup(1), "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user causes (config, input, output, services): one line, exit 2."""
    from pipelines.stack import StackError
    from tasks.lock import OutputLocked
    from tasks.passes import RunAborted
    from tasks.runner import RunConfigMismatch, SourceChangedSinceDone

    return (ConfigError, SourceError, OSError, OutputLocked, RunAborted, RunConfigMismatch, SourceChangedSinceDone,
            StackError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """The command. Run as a program (``argv`` None) it keeps stdout for its own output; called
    from Python with ``argv`` it leaves the caller's stdout alone."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    if argv is None:
        _stdout_to_stderr()
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {_describe(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
