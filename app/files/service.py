"""Datasets: validate and store a spooled upload atomically (the route caps the spool), list,
read, delete."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.db.models import File, Job, Organization
from app.errors import InvalidRequest, InvalidState, NotFound, PayloadTooLarge
from app.files.format import LINE_SHAPES, MAX_LINE_BYTES, DatasetSummary, validate_jsonl_file
from app.ids import new_id
from app.statuses import ACTIVE_JOB_STATUSES
from app.storage import ArtifactStore

PURPOSES = {"fine-tune"}
Lock = Literal["share", "update"] | None


def check_upload(*, filename: str, purpose: str | None) -> None:
    if purpose is None:
        raise InvalidRequest("Missing required parameter: purpose", param="purpose")
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be 'fine-tune'; got {purpose[:64]!r}", param="purpose")
    if not filename.lower().endswith(".jsonl"):
        raise InvalidRequest(
            f"fine-tuning files must be JSON Lines (.jsonl), not CSV; {LINE_SHAPES}",
            param="file",
        )


@dataclass(frozen=True)
class StagedUpload:
    """A validated upload already in the store under its new id, with no row yet."""

    file_id: str
    storage_key: str
    size: int
    sha256: str
    filename: str  # the user's name, a label only: the key is built from the id
    purpose: str
    summary: DatasetSummary


def stage_upload(
    *,
    spool: Path,
    size: int,
    sha256: str,
    filename: str,
    purpose: str,
    store: ArtifactStore,
    max_lines: int,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> StagedUpload:
    """Validate a spooled upload and put it into the store under a new id.

    Called with no database session open: on an object store the transfer takes network
    time, and no request may hold a connection while it waits on the network. The caller
    has checked `filename` and `purpose` (`check_upload`) before spooling. Until
    `add_file_row`'s row commits, the stored object is the caller's to delete.
    """
    summary = validate_jsonl_file(spool, max_lines=max_lines, max_line_bytes=max_line_bytes)
    file_id = new_id("file")
    key = f"datasets/{file_id}.jsonl"
    store.publish_file(spool, key)
    return StagedUpload(file_id, key, size, sha256, filename, purpose, summary)


def add_file_row(
    session: Session, *, organization: Organization, staged: StagedUpload, max_stored_bytes: int = 0
) -> File:
    """The row of a staged upload, flushed. `max_stored_bytes`: the organization's storage
    quota (0: none), held until the caller commits."""
    if max_stored_bytes:
        check_storage_quota(
            session, organization=organization, adding=staged.size, limit=max_stored_bytes
        )
    row = File(
        id=staged.file_id,
        organization_id=organization.id,
        filename=display_name(staged.filename),
        purpose=staged.purpose,
        bytes=staged.size,
        sha256=staged.sha256,
        storage_key=staged.storage_key,
        examples=staged.summary.examples,
        format=staged.summary.format,
    )
    session.add(row)
    session.flush()
    return row


def check_storage_quota(
    session: Session, *, organization: Organization, adding: int, limit: int
) -> None:
    """Refuse (413) a file that would take the organization's stored bytes past `limit`.

    The organization's row is locked first (PostgreSQL; SQLite's writer lock serialises
    the whole transaction), so concurrent uploads are counted one after the other and
    the quota holds until the caller commits its row.
    """
    session.execute(
        select(Organization.id).where(Organization.id == organization.id).with_for_update()
    )
    used = session.execute(  # an aggregate: always one row, never NULL after coalesce
        select(func.coalesce(func.sum(File.bytes), 0)).where(
            File.organization_id == organization.id
        )
    ).scalar_one()
    if used + adding > limit:
        raise PayloadTooLarge(
            f"this organization's files take {used} bytes; {adding} more would pass its "
            f"storage quota of {limit} bytes. Delete files to make room",
            param="file",
            code="storage_quota_exceeded",
        )


def display_name(filename: str) -> str:
    """The label shown back to the user: last path component, no control characters."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    return name[:255] or "upload.jsonl"


def get_file(
    session: Session, *, organization: Organization, file_id: str, lock: Lock = None
) -> File:
    """The caller's file. `lock`: "share" while a job is created on it, "update" to delete it;
    the two exclude each other on PostgreSQL (SQLite's writers are serialised anyway)."""
    query = select(File).where(File.id == file_id, File.organization_id == organization.id)
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return row


def list_files(session: Session, *, organization: Organization) -> list[File]:
    query = select(File).where(File.organization_id == organization.id)
    return list(session.scalars(query.order_by(File.created_at.desc(), File.id.desc())))


def delete_file(session: Session, *, organization: Organization, file_id: str) -> str:
    """Delete the row of a file no queued or running job reads (409 naming them otherwise).

    Returns its storage key: the caller deletes the stored bytes after its transaction
    commits, so a rollback never leaves a row without its file. The row is locked first,
    so a job being created on it either commits before (and is seen here) or finds the
    file gone; a job never starts on a file deleted under it.
    """
    row = get_file(session, organization=organization, file_id=file_id, lock="update")
    users = jobs_using(session, row)
    if users:
        raise InvalidState(
            f"file {file_id} is in use by {len(users)} queued or running fine-tuning "
            f"job(s): {', '.join(users[:5])}; cancel them or wait until they end",
            param="file_id",
            code="file_in_use",
        )
    session.delete(row)
    session.flush()
    return row.storage_key


def jobs_using(session: Session, row: File) -> list[str]:
    """Ids of the queued, running or paused jobs that train or validate on `row`, oldest first."""
    query = select(Job.id).where(
        Job.organization_id == row.organization_id,
        Job.status.in_(ACTIVE_JOB_STATUSES),
        or_(Job.training_file == row.id, Job.validation_file == row.id),
    )
    return list(session.scalars(query.order_by(Job.created_at, Job.id)))


def create_result_file(
    session: Session,
    *,
    organization_id: str,
    content: bytes,
    filename: str,
    store: ArtifactStore,
) -> File:
    """Store a job's result file (purpose `fine-tune-results`, e.g. its metrics CSV).

    The caller's transaction owns the row; when it rolls back, the caller deletes
    `row.storage_key` from the store.
    """
    file_id = new_id("file")
    row = File(
        id=file_id,
        organization_id=organization_id,
        filename=filename,
        purpose="fine-tune-results",
        bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        storage_key=f"results/{file_id}.csv",
        examples=0,
        format="csv",
    )
    with store.temp_dir() as tmp:
        (tmp / "result").write_bytes(content)
        store.publish_file(tmp / "result", row.storage_key)
    session.add(row)
    session.flush()
    return row
