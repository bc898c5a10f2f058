"""`loraforge models …`: list, download (unzipped, sha256-checked), delete."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated

import typer

from app.cli.client.connection import DEFAULT_BASE_URL, Api, ApiKey, AsJson, BaseUrl, connect, fail
from app.cli.client.output import print_json, print_table
from app.ml.adapters import ADAPTER_FILES, ADAPTER_WEIGHTS
from app.registry.download import ARCHIVE_SHA256_HEADER, WEIGHTS_SHA256_HEADER
from app.schemas.common import ListPage
from app.schemas.models import ModelDeleted, ModelRead
from app.storage import file_sha256

models_cli = typer.Typer(help="Base models and fine-tuned adapters.", no_args_is_help=True)
ModelId = Annotated[str, typer.Argument(help="A model id (ft:… for adapters and checkpoints).")]
_CHUNK = 1 << 20


@models_cli.command("list")
def list_models(
    base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Base models and this organization's adapters."""
    with connect(base_url, api_key) as api:
        body = api.call("GET", "/models")
    if as_json:
        return print_json(body)
    rows = [
        [model.id, model.kind, model.base_model or "-", model.owned_by]
        for model in ListPage[ModelRead].model_validate(body).data
    ]
    print_table(["id", "kind", "base", "owner"], rows)


@models_cli.command("download")
def download(
    model_id: ModelId,
    out: Annotated[
        Path | None,
        typer.Option("-o", "--out", help="Directory to unzip into (default: ./<id>, ':' as '-')."),
    ] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Download an adapter (or checkpoint) as PEFT files, checking both sha256 the server sends."""
    target = out or Path(model_id.replace(":", "-").replace("/", "-"))
    with connect(base_url, api_key) as api:
        sha256s = _download(api, model_id, target)
    if as_json:
        return print_json({"id": model_id, "path": str(target.absolute())} | sha256s)
    typer.echo(str(target))


def _download(api: Api, model_id: str, target: Path) -> dict[str, str]:
    """Fetch the zip, check its sha256, unzip PEFT's files into `target`, check the weights."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as body, api.stream("GET", f"/models/{model_id}/adapter") as r:
        digest = hashlib.sha256()
        for chunk in r.iter_bytes(_CHUNK):
            digest.update(chunk)
            body.write(chunk)
        expected = r.headers.get(ARCHIVE_SHA256_HEADER)
        if expected != digest.hexdigest():
            raise fail(f"the download's sha256 {digest.hexdigest()} is not the server's {expected}")
        body.seek(0)
        with zipfile.ZipFile(body) as bundle:
            names = set(bundle.namelist())
            if names != set(ADAPTER_FILES):  # only PEFT's two files, never a path of its own
                raise fail(f"unexpected files in the adapter zip: {sorted(names)}")
            for name in ADAPTER_FILES:
                with bundle.open(name) as src, (target / name).open("wb") as dest:
                    shutil.copyfileobj(src, dest, _CHUNK)
    weights, recorded = file_sha256(target / ADAPTER_WEIGHTS), r.headers.get(WEIGHTS_SHA256_HEADER)
    if weights != recorded:
        raise fail(f"the weights' sha256 {weights} is not the server's {recorded}")
    return {"sha256": digest.hexdigest(), "weights_sha256": weights}


@models_cli.command("delete")
def delete(
    model_id: ModelId,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Delete an adapter (with its checkpoints) or one checkpoint."""
    with connect(base_url, api_key) as api:
        body = api.call("DELETE", f"/models/{model_id}")
    if as_json:
        return print_json(body)
    deleted = ModelDeleted.model_validate(body)
    typer.echo(f"deleted {deleted.id}")
    for checkpoint in deleted.deleted_checkpoints:
        typer.echo(f"deleted {checkpoint}")
