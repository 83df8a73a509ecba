"""Grades given in Label Studio's own web page by two logged-in people (real Label Studio from .venv-tools,
real headless Chromium through Playwright), exported with the page's Export button, then `t2i grade import`:
the export names its annotators by bare user id, and the import names them by email when given the
server's URL (the token in LABEL_STUDIO_API_KEY), by id under the server's name when told only that, and
refuses to guess when told nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_labelstudio import make_workspace

from tasks.grading.importer import GradeImportError, LabelStudioSource, import_grades

CHROMIUM = "/usr/bin/chromium"
KEYS = ["u000", "u001"]
RATER = ("rater@example.com", "rater-password-1")  # the second person: signs up through the invite link
WAIT_MS = 60_000  # Label Studio's labeling app is megabytes of script: a busy machine takes a while to show it
pytest_plugins = ["label_studio_server"]


def t2i(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2i.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def grade_in_page(page, url: str, project: int, ratings: list[int]) -> dict[str, int]:
    """Rate the project's queue, star by star, and Submit each; {key: rating} as the page showed them."""
    from playwright.sync_api import expect

    page.goto(f"{url}/projects/{project}/data?labeling=1")
    given = {}
    for rating in ratings:
        caption = page.get_by_text("photo u0")
        expect(caption).to_be_visible(timeout=WAIT_MS)
        key = caption.inner_text().removeprefix("photo ")
        page.locator(".ant-rate-star").nth(rating - 1).click()
        expect(page.locator(".ant-rate-star-full")).to_have_count(rating, timeout=WAIT_MS)
        page.get_by_test_id("bottombar-submit-button").click()
        expect(page.get_by_text(f"photo {key}")).to_have_count(0, timeout=WAIT_MS)  # the next task, or the end
        given[key] = rating
    expect(page.get_by_text("No More Tasks Left in Queue")).to_be_visible(timeout=WAIT_MS)
    return given


@pytest.mark.slow  # 20-50 s on two idle-ish cores, 100 s on busy ones: Label Studio's app in Chromium, twice
def test_graders_of_a_page_export_named_by_email(label_studio, tmp_path):
    from playwright.sync_api import sync_playwright

    ls = label_studio.client()
    gdir = make_workspace(tmp_path / "gdir", KEYS)
    project = ls.create_grading_project(gdir, "graded in the page", votes=2)
    invite = ls.request("GET", "/api/invite").json()["invite_url"]
    export = tmp_path / "ui-export.json"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        admin = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000}).new_page()
        rater = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        for page in (admin, rater):
            page.set_default_timeout(WAIT_MS)
        admin.goto(label_studio.url + "/user/login/")
        admin.fill("#email", label_studio.email)
        admin.fill("#password", label_studio.password)
        admin.click("button[type=submit]")
        admin.wait_for_url(lambda u: "/user/login" not in u)
        rater.goto(label_studio.url + invite)
        rater.fill("#email", RATER[0])
        rater.fill("#password", RATER[1])
        rater.click("button[type=submit]")
        rater.wait_for_url(lambda u: "/user/signup" not in u)

        by_rater = grade_in_page(rater, label_studio.url, project, [4, 2])
        by_admin = grade_in_page(admin, label_studio.url, project, [5, 2])
        admin.goto(f"{label_studio.url}/projects/{project}/data")
        admin.get_by_test_id("dm-export-button").click()
        with admin.expect_download() as download:
            admin.get_by_role("button", name="Export data").click()  # the dialog's button; JSON is the default
        download.value.save_as(export)
        browser.close()
    assert sorted(by_rater) == sorted(by_admin) == KEYS

    tasks = json.loads(export.read_text())
    ids = {e: i for i, e in ls.users().items()}
    # what the page's export carries: each annotator as a bare user id, and nothing of the server
    assert {(t["data"]["key"], a["completed_by"], a["result"][0]["value"]["rating"]) for t in tasks
            for a in t["annotations"]} == {(k, ids[RATER[0]], r) for k, r in by_rater.items()} | \
        {(k, ids[label_studio.email], r) for k, r in by_admin.items()}

    with pytest.raises(GradeImportError, match=r"^ui-export\.json names 2 graders by Label Studio user id only"):
        import_grades(str(gdir), [export])  # told nothing of its server
    by_name = import_grades(str(gdir), [export], source=LabelStudioSource(server="lab"))
    assert {(r["key"], r["grader"], r["grade"]) for r in by_name.to_pylist()} == \
        {(k, f"labelstudio:lab/project-{project}/user-{ids[RATER[0]]}", r) for k, r in by_rater.items()} | \
        {(k, f"labelstudio:lab/project-{project}/user-{ids[label_studio.email]}", r) for k, r in by_admin.items()}

    imported = t2i("grade", "import", str(gdir), "--labelstudio", str(export), "--labelstudio-url", label_studio.url,
                   env={"LABEL_STUDIO_API_KEY": label_studio.token})
    assert imported.returncode == 0, imported.stderr
    assert label_studio.token not in imported.stdout + imported.stderr
    summary = json.loads(imported.stdout)
    rater_name, admin_name = f"labelstudio:{RATER[0]}", f"labelstudio:{label_studio.email}"
    assert summary["graders"] == {admin_name: 2, rater_name: 2} and summary["votes"] == 4
    (pair,) = summary["agreement"]["pairs"]
    exact = sum(by_admin[k] == by_rater[k] for k in KEYS) / 2
    assert (pair["a"], pair["b"], pair["n"], pair["exact"]) == (admin_name, rater_name, 2, exact)
    assert summary["agreement"]["units"] == 2 and summary["agreement"]["alpha_interval"] is not None

