"""`prefect deployment run curate/laion` against a real Prefect server (SQLite) and a real
process worker started by `t2i up`: completion, resume after kill -9, failure reporting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import photo_samples, write_webdataset
from test_resume import outcome

from schemas.config import load_config
from tasks.runner import run
from tasks.shards import Manifest

CHEAP = "signals: {resolution: {}, caption: {}, sharpness: {}, phash: {}}\nrules: {sharpness: {min: 300}}\n"


def deployment_run(env: dict, *params: str, watch: bool = True,
                   name: str = "curate/laion") -> subprocess.CompletedProcess | subprocess.Popen:
    args = [str(Path(sys.executable).with_name("prefect")), "deployment", "run", name]
    for p in params:
        args += ["--param", p]
    if watch:
        return subprocess.run([*args, "--watch", "--watch-timeout", "300"], env=env, capture_output=True, text=True,
                              timeout=360)
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextmanager
def client(env: dict):
    """A sync Prefect client on the test stack's server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        yield c


def test_deployment_run_completes_with_the_right_shards_and_a_summary(tmp_path, stack):
    _, _, env = stack
    for t in range(3):
        write_webdataset(tmp_path / "src" / f"{t:05d}.tar", photo_samples(f"{t}-"))
    (tmp_path / "c.yaml").write_text(CHEAP)
    result = deployment_run(env, f"source={tmp_path / 'src'}", f"out={tmp_path / 'out'}",
                            f"config={tmp_path / 'c.yaml'}", "shards_per_task=2")
    assert result.returncode == 0 and "Completed" in result.stdout, result.stdout[-2000:]
    run(tmp_path / "src", tmp_path / "ref", load_config(tmp_path / "c.yaml"), use_ray=False)
    assert outcome(tmp_path / "out") == outcome(tmp_path / "ref")

    with client(env) as c:
        keys = {a.key for a in c.read_artifacts()}
    assert {"curate-summary", "curate-progress"} <= keys


def test_the_local_worker_polls_every_second_unless_the_environment_says_otherwise(stack, monkeypatch):
    """Prefect's default poll of 10 s made each deployment run wait 5 s on average to start."""
    import psutil

    stack_mod, started, _ = stack
    expected = os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "1")  # a CI that sets it: its value wins
    assert psutil.Process(started.worker_pid).environ()["PREFECT_WORKER_QUERY_SECONDS"] == expected
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "7")
    assert stack_mod.prefect_env(started.api_url)["PREFECT_WORKER_QUERY_SECONDS"] == "7"


def test_killed_worker_then_rerun_loses_and_duplicates_nothing(tmp_path, stack):
    stack_mod, started, env = stack
    for t in range(40):
        write_webdataset(tmp_path / "src" / f"{t:05d}.tar", photo_samples(f"{t:02d}-"))
    (tmp_path / "c.yaml").write_text(CHEAP)
    params = (f"source={tmp_path / 'src'}", f"out={tmp_path / 'out'}", f"config={tmp_path / 'c.yaml'}",
              "shards_per_task=8")
    deployment_run(env, *params, watch=False).wait(timeout=60)
    deadline = time.time() + 180
    while len(Manifest(tmp_path / "out").done_ids()) < 4 and time.time() < deadline:
        time.sleep(0.05)
    worker = stack_mod.Stack.load().worker_pid
    os.killpg(worker, signal.SIGKILL)  # the worker and the flow run it started
    time.sleep(1)
    done_at_kill = len(Manifest(tmp_path / "out").done_ids())
    assert 4 <= done_at_kill < 40, "the kill must land mid-run"

    restarted = stack_mod.up(port=int(started.api_url.rsplit(":", 1)[1].split("/")[0]))
    assert restarted.worker_pid != worker and restarted.server_pid == started.server_pid
    result = deployment_run(env, *params)
    assert result.returncode == 0 and "Completed" in result.stdout, result.stdout[-2000:]
    run(tmp_path / "src", tmp_path / "ref", load_config(tmp_path / "c.yaml"), use_ray=False)
    assert outcome(tmp_path / "out") == outcome(tmp_path / "ref")


def test_a_failing_group_is_retried_reported_and_the_rest_completes(tmp_path, stack):
    _, _, env = stack
    for t in range(4):
        write_webdataset(tmp_path / "src" / f"{t:05d}.tar", photo_samples(f"{t}-"))
    broken = tmp_path / "src" / "00002.tar"
    broken.write_bytes(broken.read_bytes()[:300_000] + b"\x17" * 4096)
    (tmp_path / "c.yaml").write_text(CHEAP + "run: {task_retries: 1}\n")
    result = deployment_run(env, f"source={tmp_path / 'src'}", f"out={tmp_path / 'out'}",
                            f"config={tmp_path / 'c.yaml'}", "shards_per_task=1")
    assert result.returncode != 0 and "Failed" in result.stdout
    assert len(Manifest(tmp_path / "out").done_ids()) == 3

    with client(env) as c:
        latest = max(c.read_flow_runs(), key=lambda r: r.created)
        assert latest.state.is_failed() and "tar unreadable" in latest.state.message
        groups = [t for t in c.read_task_runs() if t.flow_run_id == latest.id and t.name.startswith("curate-")]
        assert sorted(t.run_count for t in groups) == [1, 1, 1, 2]  # the broken group ran twice
        assert sum(t.state.is_failed() for t in groups) == 1


def test_train_deployment_trains_on_analyzed_shards_and_exports(tmp_path, stack):
    """`prefect deployment run train/kolors` on `t2i analyze` output: Completed, a KolorsPipeline folder."""
    import yaml

    from trainer.export import load_pipeline

    _, _, env = stack
    write_webdataset(tmp_path / "src" / "00000.tar", photo_samples())
    (tmp_path / "c.yaml").write_text(CHEAP)
    cheap_no_rules = load_config(tmp_path / "c.yaml").model_copy(update={"rules": {}})
    run(tmp_path / "src", tmp_path / "curated", cheap_no_rules, mode="analyze", use_ray=False)
    train_cfg = {"model": {"preset": "tiny"}, "steps": 2, "checkpoint_every": 2, "sample_prompts": [],
                 "data": {"resolution": 64, "bucketed": False, "batch_size": 2}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_cfg))
    result = deployment_run(env, f"out={tmp_path / 'run'}", f'shards=["{tmp_path / "curated"}"]',
                            f"config={tmp_path / 'train.yaml'}", name="train/kolors")
    assert result.returncode == 0 and "Completed" in result.stdout, result.stdout[-2000:]
    assert load_pipeline(tmp_path / "run" / "model").scheduler.config.num_train_timesteps == 1000  # stage concept
    with client(env) as c:
        assert "train-summary" in {a.key for a in c.read_artifacts()}


def test_groups_do_not_wait_for_a_slow_group(tmp_path, stack):
    """One big shard (its own group) runs while the small groups start, run and finish: no
    barrier between groups. The sequential flow of before started group 2 when group 1 ended."""
    _, _, env = stack
    write_webdataset(tmp_path / "src" / "00000.tar",
                     [s for r in range(8) for s in photo_samples(f"big{r}-")])  # 8x the others
    for t in range(1, 4):
        write_webdataset(tmp_path / "src" / f"{t:05d}.tar", photo_samples(f"{t}-"))
    (tmp_path / "c.yaml").write_text(CHEAP + "run: {workers: 2}\n")
    result = deployment_run(env, f"source={tmp_path / 'src'}", f"out={tmp_path / 'out'}",
                            f"config={tmp_path / 'c.yaml'}", "shards_per_task=1")
    assert result.returncode == 0 and "Completed" in result.stdout, result.stdout[-2000:]
    with client(env) as c:
        latest = max(c.read_flow_runs(), key=lambda r: r.created)
        groups = sorted((t for t in c.read_task_runs() if t.flow_run_id == latest.id
                         and t.name.startswith("curate-")), key=lambda t: t.start_time)
    assert len(groups) == 4
    big = max(groups, key=lambda t: t.end_time - t.start_time)  # 00000.tar, the first group submitted
    others = [t for t in groups if t is not big]
    assert sum(t.end_time < big.end_time for t in others) >= 2, [(t.start_time, t.end_time) for t in groups]
