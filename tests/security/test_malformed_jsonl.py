"""A corpus of malformed JSONL uploads through the API: 400 naming the line, nothing kept."""

from __future__ import annotations

import json

import pytest

from tests.factories import stored_nothing, upload

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
GOOD = json.dumps({"messages": [U, A]}).encode() + b"\n"


def ln(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def chat(*messages: object, **extra: object) -> bytes:
    return ln({"messages": list(messages), **extra})


# (case id, file bytes, the line the error must name; None: a whole-file error)
CORPUS: list[tuple[str, bytes, int | None]] = [
    ("bad-utf8", GOOD + b'{"text": "caf\xe9"}\n', 2),
    ("overlong-utf8", GOOD + b'{"text": "\xc0\xaf"}\n', 2),
    ("utf8-bom", b"\xef\xbb\xbf" + GOOD, 1),
    ("utf16-le", "\ufeff".encode("utf-16-le") + GOOD.decode().encode("utf-16-le"), 1),
    ("bare-cr-separators", GOOD.replace(b"\n", b"\r") * 3, 1),
    ("crlf-then-bad-line", GOOD.replace(b"\n", b"\r\n") + b"{oops}\r\n", 2),
    ("two-mb-line", GOOD + ln({"text": "x" * (2 * 1024 * 1024)}), 2),
    ("empty-file", b"", None),
    ("only-blank-lines", b"\n\n\n", None),
    ("blank-line-between", GOOD + b"\n" + GOOD, 2),
    ("not-json", GOOD + b"{not json}\n", 2),
    ("truncated-json", GOOD + b'{"messages": [\n', 2),
    ("json-array-line", GOOD + b"[1, 2]\n", 2),
    ("json-string-line", GOOD + b'"text"\n', 2),
    ("nan", GOOD + b'{"text": NaN}\n', 2),
    ("infinity", GOOD + b'{"prompt": "a", "completion": Infinity}\n', 2),
    ("duplicate-key", GOOD + b'{"text": "a", "text": "b"}\n', 2),
    ("deep-nesting", GOOD + b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", 2),
    ("lone-surrogate", GOOD + b'{"text": "\\ud800"}\n', 2),
    ("missing-messages-key", GOOD + ln({"messagez": [U, A]}), 2),
    ("extra-top-level-key", GOOD + chat(U, A, tools=[]), 2),
    ("missing-completion", ln({"prompt": "a"}), 1),
    ("extra-message-key", GOOD + chat(U, {**A, "tool_calls": []}), 2),
    ("missing-role", GOOD + chat({"content": "hi"}, A), 2),
    ("missing-content", GOOD + chat(U, {"role": "assistant"}), 2),
    ("unknown-role", GOOD + chat({"role": "tool", "content": "x"}, A), 2),
    ("content-is-number", GOOD + chat({"role": "user", "content": 3}, A), 2),
    ("content-parts-list", GOOD + chat({"role": "user", "content": [{"type": "text"}]}, A), 2),
    ("messages-not-list", GOOD + ln({"messages": "hi"}), 2),
    ("messages-empty", GOOD + ln({"messages": []}), 2),
    ("no-assistant", GOOD + chat(U), 2),
    ("all-weights-zero", GOOD + chat(U, {**A, "weight": 0}), 2),
    ("weight-is-string", GOOD + chat(U, {**A, "weight": "1"}), 2),
    ("weight-on-user", GOOD + chat({**U, "weight": 1}, A), 2),
    ("empty-assistant", GOOD + chat(U, {"role": "assistant", "content": ""}), 2),
    ("mixed-formats", GOOD + ln({"text": "hello"}), 2),
    ("prompt-is-null", ln({"prompt": None, "completion": "x"}), 1),
    ("empty-text", ln({"text": ""}), 1),
    ("too-many-rows", GOOD * 51, 51),
    ("huge-number", GOOD + b'{"text": "a", "n": ' + b"9" * 5000 + b"}\n", 2),
]


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30 and len({case for case, _, _ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("case", "content", "line"), CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_file_is_refused_naming_the_line_and_nothing_is_kept(
    client, settings, case, content, line
):
    settings.max_lines_per_file = 50
    response = upload(client, content)
    assert response.status_code == 400, (case, response.text)
    error = response.json()["error"]
    assert error["param"] == "file" and error["code"] == "invalid_file"
    if line is not None:
        assert error["message"].startswith(f"line {line}:"), error["message"]
    else:
        assert "no examples" in error["message"]
    assert len(error["message"]) < 400  # names the problem, does not echo the file
    assert stored_nothing(settings)
    assert client.get("/v1/files").json()["data"] == []


def test_windows_line_endings_are_accepted_and_stored_as_sent(client):
    content = GOOD.replace(b"\n", b"\r\n") * 3
    response = upload(client, content)
    assert response.status_code == 200, response.text
    assert client.get(f"/v1/files/{response.json()['id']}/content").content == content
