from __future__ import annotations

from fastapi.testclient import TestClient

from tests.factories import uploaded_file


def test_requests_without_a_valid_key_are_401(app):
    with TestClient(app) as anonymous:
        for headers in ({}, {"Authorization": "Bearer lf-wrong"}, {"Authorization": "Basic abc"}):
            response = anonymous.get("/v1/files", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert anonymous.get("/health").json() == {"status": "ok"}


def test_another_organization_sees_404_exactly_like_unknown_ids(client, other_client):
    file_id = uploaded_file(client, 3)
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    ).json()["id"]
    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
    ]:
        foreign = other_client.request(method, path)
        unknown = other_client.request(
            method, path.replace(file_id, "file-unknown").replace(job_id, "ftjob-unknown")
        )
        assert foreign.status_code == 404, (method, path)
        assert foreign.json()["error"]["message"].replace(file_id, "X").replace(job_id, "X") == (
            unknown.json()["error"]["message"]
            .replace("file-unknown", "X")
            .replace("ftjob-unknown", "X")
        )
    assert other_client.get("/v1/files").json()["data"] == []
    assert other_client.get("/v1/fine_tuning/jobs").json()["data"] == []
    using_foreign_file = other_client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    )
    assert (
        using_foreign_file.status_code == 400
        and using_foreign_file.json()["error"]["param"] == "training_file"
    )
    assert client.get(f"/v1/files/{file_id}").status_code == 200
