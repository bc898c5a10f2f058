"""The dashboard's files at /ui: served without a key, each with the strict CSP, and the page
loads nothing but its own files (no CDN, no inline script)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.ui.files import CONTENT_SECURITY_POLICY, STATIC_DIR


def test_ui_answers_the_page_with_a_strict_policy(app) -> None:
    with TestClient(app) as anonymous:  # the page itself holds no data: no key needed
        page = anonymous.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in CONTENT_SECURITY_POLICY
        assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
        assert page.headers["x-content-type-options"] == "nosniff"
        assert anonymous.get("/ui", follow_redirects=False).status_code in (307, 308)


def test_every_module_is_served_as_javascript_with_the_policy(app) -> None:
    with TestClient(app) as anonymous:
        for path in sorted(STATIC_DIR.rglob("*.js")):
            answer = anonymous.get(f"/ui/{path.relative_to(STATIC_DIR).as_posix()}")
            assert answer.status_code == 200, path
            assert "javascript" in answer.headers["content-type"], path
            assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_nothing_outside_the_static_folder_is_served(app) -> None:
    with TestClient(app) as anonymous:
        assert anonymous.get("/ui/../files.py").status_code == 404
        assert anonymous.get("/ui/%2e%2e/files.py").status_code == 404


def test_the_assets_load_nothing_from_elsewhere_and_never_write_html() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script (CSP forbids it)"
    for path in [STATIC_DIR / "index.html", *STATIC_DIR.rglob("*.js"), *STATIC_DIR.rglob("*.css")]:
        text = path.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path
        # data becomes text nodes: no HTML string sinks anywhere
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
            assert sink not in text, (path, sink)
