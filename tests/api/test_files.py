from __future__ import annotations

import pytest

from tests.factories import chat_rows, commit_fails, jsonl, stored_nothing, upload


def test_upload_list_retrieve_content_delete(client):
    content = jsonl(chat_rows(3))
    created = upload(client, content)
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["bytes"] == len(content) and body["filename"] == "train.jsonl"
    assert body["purpose"] == "fine-tune" and body["status"] == "processed"
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [body["id"]]
    assert client.get(f"/v1/files/{body['id']}").json() == body
    assert client.get(f"/v1/files/{body['id']}/content").content == content
    deleted = client.delete(f"/v1/files/{body['id']}")
    assert deleted.json() == {"id": body["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{body['id']}").status_code == 404


def test_invalid_line_is_refused_naming_it_and_nothing_is_stored(client, settings):
    content = jsonl(chat_rows(2)) + b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    response = upload(client, content)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"].startswith("line 3:") and "assistant" in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == "file"
    assert stored_nothing(settings)


def test_not_json_is_refused(client, settings):
    response = upload(client, jsonl(chat_rows(1)) + b"{not json\n")
    assert response.status_code == 400 and "line 2" in response.json()["error"]["message"]
    assert stored_nothing(settings)


def test_wrong_purpose_and_extension(client, settings):
    bad_purpose = upload(client, jsonl(chat_rows(1)), purpose="assistants")
    assert bad_purpose.status_code == 400 and bad_purpose.json()["error"]["param"] == "purpose"
    bad_name = upload(client, jsonl(chat_rows(1)), name="train.csv")
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "file"
    assert stored_nothing(settings)


def test_upload_over_the_cap_is_413_and_nothing_is_stored(client, settings):
    settings.max_upload_bytes = 200
    response = upload(client, jsonl(chat_rows(20)))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert stored_nothing(settings)


def test_missing_purpose_names_the_field(client):
    response = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_rows(1)))})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"


def test_a_delete_that_does_not_commit_keeps_the_stored_file(
    client, monkeypatch: pytest.MonkeyPatch
):
    """The bytes go only once the row's deletion has committed: never a row without its file."""
    from app.api.routes import files as files_routes

    file_id = upload(client, jsonl(chat_rows(3))).json()["id"]
    monkeypatch.setattr(files_routes, "commit", commit_fails)
    assert client.delete(f"/v1/files/{file_id}").status_code == 503
    assert client.get(f"/v1/files/{file_id}/content").status_code == 200
