"""`t2i grade ...`: sample for grading, the grading page, import of votes, the model that carries
grades to the pool (tasks/grading/). Each subcommand prints JSON on stdout."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

Print = Callable[[str], None]
TOKEN_ENV = "LABEL_STUDIO_API_KEY"  # the Label Studio SDK's own name for it; never an option (ps would show it)
SOURCE_DESTS = {"labelstudio_url": "--labelstudio-url", "labelstudio_users": "--labelstudio-users",
                "labelstudio_server": "--labelstudio-server"}
log = logging.getLogger(__name__)


class _InOrder(argparse.Action):
    """Keeps --labelstudio and the options saying where its exports came from in the order given
    (``labelstudio_order``: (dest, value) pairs), since a source option applies to the exports after it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.labelstudio_order = [*(getattr(namespace, "labelstudio_order", None) or []), (self.dest, values)]


def group_exports(order: list[tuple[str, Any]]) -> list[tuple[str, dict[str, str]]]:
    """Each export with the source options that apply to it (dest -> value): given once, they apply to
    every export wherever they stand; for several servers, each server's options come before its exports."""
    from tasks.grading.importer import GradeImportError

    groups: list[tuple[dict[str, str], list[str]]] = []
    for dest, value in order:
        if dest == "labelstudio":
            if not groups:
                groups.append(({}, []))
            groups[-1][1].extend(value)
            continue
        if not groups or groups[-1][1]:
            groups.append(({}, []))
        if dest in groups[-1][0]:
            raise GradeImportError(f"{SOURCE_DESTS[dest]} given twice for the same exports ({groups[-1][0][dest]}, "
                                   f"{value}): give each server's options before its --labelstudio exports")
        groups[-1][0][dest] = value
    described = [opts for opts, _ in groups if opts]
    if len(described) == 1:
        return [(path, described[0]) for _, paths in groups for path in paths]
    for opts, paths in groups:
        if opts and not paths:
            given = " ".join(f"{SOURCE_DESTS[d]} {v}" for d, v in opts.items())
            raise GradeImportError(f"{given} is followed by no --labelstudio export: give each server's options "
                                   "before its exports")
    return [(path, opts) for opts, paths in groups for path in paths]


def _as_user_error(fn: Callable[..., int]) -> Callable[..., int]:
    """The grading modules' own errors (a bad sample request, an export of another project) are the
    user's: one ``error:`` line and exit 2, as for a bad config."""
    def wrapped(*args: Any) -> int:
        from schemas.config import ConfigError
        from tasks.grading.export import ExportError
        from tasks.grading.importer import GradeImportError

        try:
            return fn(*args)
        except (ExportError, GradeImportError) as exc:
            raise ConfigError(str(exc)) from exc

    return wrapped


def add_parser(sub: Any, say: Print) -> None:
    grade = sub.add_parser("grade", help="five-level human grades: export a sample, grade it, carry grades to the pool")
    cmds = grade.add_subparsers(dest="grade_command", required=True)

    p = cmds.add_parser("export", help="a sample stratified by the signals, for the page and for Label Studio")
    p.add_argument("--shards", required=True, help="a t2i curate output")
    p.add_argument("--n", type=int, required=True, help="rows to draw (a later round draws new ones)")
    p.add_argument("--out", required=True, help="the grading workspace (GDIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uncertain", help="a previous round's predictions (the grades sidecar): half from the least sure")
    p.set_defaults(func=lambda a: _export(a, say))

    p = cmds.add_parser("serve", help="the grading page on 127.0.0.1 (keys 1-5 grade, arrows go back and forth)")
    p.add_argument("gdir")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--votes", type=int, default=3, help="votes each image collects")
    p.set_defaults(func=_serve)

    p = cmds.add_parser("import", help="the page's votes and Label Studio JSON exports into GDIR/grades.parquet",
                        epilog="Graders are named by email where the export, the server or a users file tells "
                               "it, else by user id under the server's name. The source options apply to the "
                               "exports after them (given once: to all); the token comes from " + TOKEN_ENV + ".")
    p.add_argument("gdir")
    p.add_argument("--labelstudio", nargs="*", action=_InOrder, metavar="EXPORT",
                   help="Label Studio JSON exports of the workspace's tasks")
    p.add_argument("--labelstudio-url", action=_InOrder, metavar="URL",
                   help=f"the server the exports came from: with {TOKEN_ENV} set, graders named by email "
                        "(its users listed, each export checked to be its own); else by id under this name")
    p.add_argument("--labelstudio-users", action=_InOrder, metavar="USERS.json",
                   help="the server's users (GET /api/users/ saved, or {id: email}): graders named by email")
    p.add_argument("--labelstudio-server", action=_InOrder, metavar="NAME",
                   help="a name for the server the exports came from: graders labelstudio:NAME/project-P/user-ID")
    p.set_defaults(func=lambda a: _import(a, say), labelstudio_order=[])

    p = cmds.add_parser("fit", help="a model of the graded rows' levels over their signals, with held-out figures")
    p.add_argument("--shards", required=True)
    p.add_argument("--grades", required=True, help="GDIR/grades.parquet (or the workspace)")
    p.add_argument("--model", required=True, help="where the model goes (.npz: arrays only, no pickle)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: _fit(a, say))

    p = cmds.add_parser("predict", help="quality_level and its confidence for every row: a sidecar set (grades/)")
    p.add_argument("--shards", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--set", default="grades", help="the sidecar set's name")
    p.add_argument("--no-ray", action="store_true")
    p.set_defaults(func=lambda a: _predict(a, say))


@_as_user_error
def _export(args: argparse.Namespace, say: Print) -> int:
    from tasks.grading.export import export_sample

    done = export_sample(args.shards, args.n, args.out, seed=args.seed, uncertain=args.uncertain)
    say(json.dumps({k: v for k, v in done.items() if k != "keys"} | {"drawn": len(done.get("keys", []))}, indent=1,
                   default=str))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tasks.grading.server import run_server

    run_server(args.gdir, port=args.port, votes_per_image=args.votes)
    return 0


@_as_user_error
def _import(args: argparse.Namespace, say: Print) -> int:
    from tasks.grading.importer import grade_summary, import_grades, labelstudio_source
    from tasks.grading.votes import agreement

    token, sources = os.environ.get(TOKEN_ENV) or None, {}
    exports = []
    for path, opts in group_exports(args.labelstudio_order):
        key = tuple(sorted(opts.items()))
        if key not in sources:
            if opts.get("labelstudio_url") and not token and not opts.get("labelstudio_users"):
                log.warning("%s is not set: graders of %s are named by user id, not email", TOKEN_ENV,
                            opts["labelstudio_url"])
            sources[key] = labelstudio_source(url=opts.get("labelstudio_url"), token=token, server=opts.get(
                "labelstudio_server"), users=opts.get("labelstudio_users"))
        exports.append((path, sources[key]))
    table = import_grades(args.gdir, exports)
    agreed = agreement(table.select(["key", "grader", "grade"]).to_pylist())  # page and Label Studio votes alike
    say(json.dumps({**grade_summary(table), "agreement": agreed}, indent=1, default=str))
    return 0


@_as_user_error
def _fit(args: argparse.Namespace, say: Print) -> int:
    from tasks.grading import GRADES
    from tasks.grading.model import fit_grades

    grades = Path(args.grades) / GRADES if Path(args.grades).is_dir() else args.grades
    model = fit_grades(args.shards, grades, seed=args.seed)
    path = model.save(args.model)
    say(json.dumps({"model": str(path), "model_id": model.model_id, **asdict(model.report)}, indent=1, default=str))
    return 0


@_as_user_error
def _predict(args: argparse.Namespace, say: Print) -> int:
    from tasks.grading.grade_pass import predict_pool

    summary = predict_pool(args.shards, args.model, set_name=args.set, use_ray=not args.no_ray)
    say(json.dumps(summary.to_dict(), indent=1))
    return 1 if summary.failed else 0
