"""The cross-shard duplicate-key pass as a commit: killed at every step, killed -9, out of disk.

An interrupted pass must never show a row both kept and rejected, nor a half-written file,
to readers of shards/*.parquet and rejects/*.parquet; the next call finishes it, and the result
is the one an uninterrupted pass gives, with manifest entries that tell the files on disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import photo_samples, write_webdataset

from schemas.config import Bounds, CurateConfig, OutputConfig
from tasks import dedupe
from tasks.dedupe import dedupe_keys
from tasks.process import process_shard
from tasks.runner import run
from tasks.sources import discover
from tasks.stats import compute_stats

ROOT = Path(__file__).parents[1]
VISIBLE = ("shards", "rejects", "_manifest")
COUNTS = ("kept", "rejected", "reasons", "files")  # what the pass changes in a manifest entry


def curate_config(rows_per_part: int) -> CurateConfig:
    """One cheap signal and a rule that rejects 3 of the 12 photos, so manifests hold other
    reasons besides duplicate_key; small parts, so a shard's duplicates span several."""
    return CurateConfig(signals={"resolution": {}}, rules={"short_side": Bounds(min=400)},
                        output=OutputConfig(max_rows_per_shard=rows_per_part))


def overlapping_source(root: Path, tars: int) -> Path:
    """Tar t holds keys k{5t}..k{5t+11}: each shares keys with the next two."""
    for t in range(tars):
        samples = [(f"k{i + 5 * t:03d}", image, caption, ext)
                   for i, (_, image, caption, ext) in enumerate(photo_samples())]
        write_webdataset(root / f"{t:05d}.tar", samples)
    return root


@dataclass
class Built:
    src: Path
    cfg: CurateConfig
    base: Path  # all shards done, no duplicate pass yet
    ref: Path  # base after one uninterrupted pass
    moved: int

    def copy(self, to: Path) -> Path:
        shutil.copytree(self.base, to)
        return to


def build(root: Path, tars: int, rows_per_part: int) -> Built:
    src, cfg = overlapping_source(root / "src", tars), curate_config(rows_per_part)
    run(src, root / "base", cfg, use_ray=False, dedupe=False)
    shutil.copytree(root / "base", root / "ref")
    built = Built(src, cfg, root / "base", root / "ref", dedupe_keys(root / "ref"))
    assert built.moved > 0 and dup_rejects(built.base) == 0
    return built


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("small"), tars=3, rows_per_part=4)


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("large"), tars=8, rows_per_part=1)


# -- what readers see ---------------------------------------------------------------------------


def rows(out: Path, kind: str, columns: str) -> list[tuple]:
    if not list((out / kind).glob("*.parquet")):
        return []
    return duckdb.sql(f"SELECT {columns} FROM read_parquet('{out}/{kind}/*.parquet', union_by_name=true) "
                      "ORDER BY ALL").fetchall()


def view(out: Path) -> dict[str, Any]:
    """Everything a reader of the output sees, to compare two outputs."""
    return {"kept": rows(out, "shards", "source, key"), "rejected": rows(out, "rejects", "source, key, reason"),
            "files": sorted(str(p.relative_to(out)) for kind in VISIBLE for p in (out / kind).iterdir()),
            "manifest": manifest(out)}


def manifest(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "_manifest").glob("*.json"))}


def dup_rejects(out: Path) -> int:
    return sum(1 for *_, reason in rows(out, "rejects", "source, key, reason") if reason == "duplicate_key")


def digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.blake2b(p.read_bytes()).hexdigest()
            for kind in VISIBLE for p in sorted((out / kind).rglob("*")) if p.is_file()}


def assert_consistent(out: Path) -> None:
    """What an interrupted pass may leave: every visible file whole, no row both kept and rejected."""
    for kind in ("shards", "rejects"):
        for part in (out / kind).glob("*.parquet"):
            pq.read_table(part)  # a half-written file fails here
    both = set(rows(out, "shards", "source, key")) & set(rows(out, "rejects", "source, key"))
    assert not both, f"kept and rejected at once: {sorted(both)[:3]}"


def assert_manifest_tells_the_disk(out: Path) -> None:
    """Each entry's files are exactly its shard's files, its counts their rows; the sums are
    what DuckDB and `t2i stats` count."""
    entries = manifest(out)
    for shard_id, entry in entries.items():
        files = sorted(str(p.relative_to(out)) for kind in ("shards", "rejects")
                       for p in (out / kind).glob(f"{shard_id}.part*.parquet"))
        assert sorted(entry["files"]) == files
        kept = [f for f in files if f.startswith("shards/")]
        reasons = Counter(r for f in files if f.startswith("rejects/")
                          for r in pq.read_table(out / f, columns=["reason"])["reason"].to_pylist())
        assert entry["kept"] == sum(pq.read_metadata(out / f).num_rows for f in kept)
        assert (entry["rejected"], entry["reasons"]) == (sum(reasons.values()), dict(reasons))
    stats = compute_stats(out)
    total_reasons = sum((Counter(e["reasons"]) for e in entries.values()), Counter())
    assert stats["kept"] == sum(e["kept"] for e in entries.values()) == len(rows(out, "shards", "key"))
    assert stats["rejected"] == sum(e["rejected"] for e in entries.values()) == len(rows(out, "rejects", "key"))
    assert stats["reasons"] == dict(total_reasons) and stats["duplicate_keys"] == 0


def assert_no_leftovers(out: Path) -> None:
    assert not (out / "_dedupe").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or p.name.endswith(".staged")]


def assert_finished(out: Path, ref: Path) -> None:
    assert view(out) == view(ref)
    assert_no_leftovers(out)


def test_one_pass_keeps_the_first_and_the_manifest_tells_the_disk(small, tmp_path):
    out = small.copy(tmp_path / "out")
    assert dedupe_keys(out) == small.moved == dup_rejects(small.ref)
    assert_consistent(out)
    assert_manifest_tells_the_disk(out)
    assert_no_leftovers(out)
    kept_keys = [k for _, k in rows(out, "shards", "source, key")]
    assert len(kept_keys) == len(set(kept_keys))
    base_entries, entries = manifest(small.base), manifest(out)
    for shard_id, entry in entries.items():  # only the counts and files changed
        assert {k: v for k, v in entry.items() if k not in COUNTS} == \
               {k: v for k, v in base_entries[shard_id].items() if k not in COUNTS}
    assert any(".dupes-" in f for e in entries.values() for f in e["files"])
    assert dedupe_keys(out) == 0  # idempotent
    assert_finished(out, small.ref)


# -- a kill (or an I/O error) at each step ------------------------------------------------------


class Killed(BaseException):
    """A kill as seen from inside: nothing after it runs, no `except Exception` cleans up."""


PRIMITIVES = (("os", "replace"), ("os", "unlink"), ("os", "rmdir"), ("os", "fsync"), ("pq", "write_table"))


@contextmanager
def failing_at(k: int | None, error: BaseException) -> Iterator[list[int]]:
    """Make the k-th call (from 0) of the pass's I/O primitives raise ``error`` (never, for
    None); a Parquet write leaves half its file first. Yields the call count."""
    calls = [0]
    modules = {"os": os, "pq": pq}

    def wrap(real, half_write: bool):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] - 1 != k:
                return real(*args, **kwargs)
            if half_write:
                real(*args, **kwargs)
                where = args[1]
                if hasattr(where, "truncate"):  # written through an open file
                    where.flush()
                    where.truncate(where.tell() // 2)
                else:
                    path = Path(where)
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise error
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        for module, name in PRIMITIVES:
            mp.setattr(modules[module], name, wrap(getattr(modules[module], name), name == "write_table"))
        yield calls


def count_calls(built: Built, tmp: Path) -> int:
    out = built.copy(tmp)
    with failing_at(None, Killed()) as calls:
        dedupe_keys(out)
    shutil.rmtree(out)
    return calls[0]


def interrupt(out: Path, k: int, error: BaseException) -> bool:
    """Run the pass with its k-th I/O call failing; True if it failed."""
    with failing_at(k, error):
        try:
            dedupe_keys(out)
        except (Killed, OSError):
            return True
    return False


def assert_rerun_finishes(out: Path, built: Built) -> None:
    """Rows the interrupted attempt already published plus those the rerun moves are the pass's."""
    published = dup_rejects(out)
    assert published + dedupe_keys(out) == built.moved
    assert_finished(out, built.ref)


@pytest.mark.parametrize("error", [Killed(), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["killed", "enospc"])
def test_interrupted_at_every_step_then_rerun(small, tmp_path, error):
    total = count_calls(small, tmp_path / "count")
    assert total > 30
    before = digests(small.base)
    for k in range(total + 1):
        out = small.copy(tmp_path / f"out{k}")
        failed = interrupt(out, k, error)
        assert_consistent(out)
        if failed and isinstance(error, OSError) and not (out / "_dedupe" / "journal.json").exists():
            assert not (out / "_dedupe").exists(), f"step {k}: an error before the commit leaves no temporaries"
            assert digests(out) == before, f"step {k}: an error before the commit changes nothing"
        assert_rerun_finishes(out, small)
        shutil.rmtree(out)


def test_a_kill_while_finishing_a_killed_pass(small, tmp_path):
    """Killed after the commit point, then the call that finishes it is killed at each step too."""
    total = count_calls(small, tmp_path / "count")
    first = next(k for k in range(total) if committed(small, tmp_path / "probe", k))
    for k in (first, (first + total) // 2):
        out = small.copy(tmp_path / "killed")
        assert interrupt(out, k, Killed())
        recovery = tmp_path / "recovery"
        shutil.copytree(out, recovery)
        steps = count_calls(Built(small.src, small.cfg, out, small.ref, small.moved), tmp_path / "count2")
        for j in range(steps + 1):
            again = tmp_path / f"again{j}"
            shutil.copytree(recovery, again)
            interrupt(again, j, Killed())
            assert_consistent(again)
            assert dedupe_keys(again) <= small.moved
            assert_finished(again, small.ref)
            shutil.rmtree(again)
        shutil.rmtree(out)
        shutil.rmtree(recovery)


def committed(built: Built, probe: Path, k: int) -> bool:
    out = built.copy(probe)
    interrupt(out, k, Killed())
    found = (out / "_dedupe" / "journal.json").exists()
    shutil.rmtree(out)
    return found


def test_a_shard_redone_after_a_killed_pass_is_planned_again(small, tmp_path, caplog, monkeypatch):
    """Killed between a part's rename and its reject file's; that shard then loses its manifest
    entry (its source changed, say) and is done again before the next pass. The journal's steps
    for it no longer match its files: they are dropped, not applied over the new files (its
    reject file would repeat rows the redone part holds), and the new pass moves its duplicates.
    (A run finishes a killed pass before it redoes any shard, see the next test; this is the
    journal's own guard against a redo by any other means.)"""
    total = count_calls(small, tmp_path / "count")
    out = small.copy(tmp_path / "out")
    first_rename = next(k for k in range(total) if committed(small, tmp_path / "probe", k)) + 1
    assert interrupt(out, first_rename + 1, Killed())
    journal = json.loads((out / "_dedupe" / "journal.json").read_text())
    part, reject = journal[0]["renames"][:2]
    assert not (out / part["src"]).exists() and (out / reject["src"]).exists()
    victim = journal[0]["shard_id"]
    (out / "_manifest" / f"{victim}.json").unlink()
    shard = next(x for x in discover(small.src, small.cfg.source) if x.shard_id == victim)
    process_shard(shard, small.cfg, out)

    prepare = dedupe._prepare  # between finishing the old journal and planning anew
    monkeypatch.setattr(dedupe, "_prepare", lambda store: (assert_consistent(Path(store.path())), prepare(store))[1])
    dedupe_keys(out)
    assert f"shard {victim} changed since the duplicate-key pass was planned" in caplog.text
    assert_consistent(out)
    assert_manifest_tells_the_disk(out)
    got, want = view(out), view(small.ref)
    for entries in (got["manifest"], want["manifest"]):  # the redo has its own timings
        entries[victim] = {k: entries[victim][k] for k in ("shard_id", "source", *COUNTS)}
    assert got == want
    assert_no_leftovers(out)


def test_a_run_finishes_a_killed_pass_before_anything_else(small, tmp_path):
    total = count_calls(small, tmp_path / "count")
    out = small.copy(tmp_path / "out")
    first_rename = next(k for k in range(total) if committed(small, tmp_path / "probe", k)) + 1
    assert interrupt(out, first_rename + 1, Killed())
    assert (out / "_dedupe" / "journal.json").exists()
    assert run(small.src, out, small.cfg, use_ray=False, dedupe=False).shards_done == 0
    assert not (out / "_dedupe").exists()
    assert_consistent(out)
    assert_manifest_tells_the_disk(out)


def test_outputs_of_the_old_in_place_pass_are_repaired(small, tmp_path):
    """The old pass left a reject file beside the part still holding its rows (killed, or out of
    disk, in between), a `.parquet.tmp-PID` file, and manifests with pre-pass counts."""
    out = small.copy(tmp_path / "out")
    dupes = sorted((small.ref / "rejects").glob("*.dupes-*.parquet"))[0]
    shutil.copy(dupes, out / "rejects" / dupes.name)
    part = sorted((out / "shards").glob("*.parquet"))[-1]
    (out / "shards" / f".{part.name}.tmp-16035").write_bytes(b"half a part")
    (out / "_manifest" / ".x.json.tmp-16035").write_bytes(b"{")
    dedupe_keys(out)
    assert_finished(out, small.ref)

    done_by_old_code = tmp_path / "old"
    shutil.copytree(small.ref, done_by_old_code)
    shutil.rmtree(done_by_old_code / "_manifest")
    shutil.copytree(small.base / "_manifest", done_by_old_code / "_manifest")
    assert dedupe_keys(done_by_old_code) == 0
    assert_finished(done_by_old_code, small.ref)


# -- a real kill -9 -----------------------------------------------------------------------------


PASS = ("import sys, time\nfrom tasks.dedupe import dedupe_keys\nprint('ready', flush=True)\n"
        "started = time.perf_counter()\nmoved = dedupe_keys(sys.argv[1])\n"
        "print('done', moved, time.perf_counter() - started, flush=True)\n")


def start_pass(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PASS, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_kill_dash_nine_during_the_pass_then_rerun(large, tmp_path):
    proc = start_pass(large.copy(tmp_path / "timed"))
    seconds = float(proc.communicate(timeout=120)[0].split()[-1])
    interrupted = 0
    for i, fraction in enumerate((0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)):
        out = large.copy(tmp_path / f"out{i}")
        proc = start_pass(out)
        time.sleep(seconds * fraction)
        os.kill(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=60)
        interrupted += "done" not in stdout
        assert_consistent(out)
        assert_rerun_finishes(out, large)
    assert interrupted >= 3, "most kills must land during the pass"


# -- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 64 MiB tmpfs of its own, so a test can fill it without filling anyone else's disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        busy = subprocess.run(["umount", str(mount)], capture_output=True, text=True)
        if busy.returncode:  # a file the failed pass left open (it holds its space too)
            subprocess.run(["umount", "--lazy", str(mount)], check=True)
            pytest.fail(f"files left open on the full disk: {busy.stderr.strip()}")


def written_by_the_pass(built: Built) -> int:
    """Bytes of the files the pass writes (new part versions, reject files, manifest entries)."""
    before = digests(built.base)
    after = digests(built.ref)
    return sum((built.ref / name).stat().st_size for name, d in after.items() if before.get(name) != d)


@pytest.mark.parametrize("room", [0.0, 0.35, 0.7])
def test_a_full_disk_changes_nothing_and_a_rerun_after_freeing_space_completes(small, small_disk, room):
    out = small.copy(small_disk / "out")
    before = digests(out)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, free - int(room * written_by_the_pass(small)))
    with pytest.raises(OSError) as failed:
        dedupe_keys(out)
    assert failed.value.errno == errno.ENOSPC or "No space left" in str(failed.value)
    assert digests(out) == before
    assert not (out / "_dedupe").exists()
    ballast.unlink()
    assert dedupe_keys(out) == small.moved
    assert_finished(out, small.ref)
