"""A GCS test double that enforces generation preconditions, over real HTTP.

gcp-storage-emulator accepts `ifGenerationMatch` / `ifGenerationNotMatch` and ignores them (a create with
`ifGenerationMatch=0` over an existing object succeeds), so compare-and-swap protocols cannot be tested
against it. This module runs the real emulator in a subprocess with its JSON-API object handlers wrapped:

- uploads (`POST /upload/storage/v1/b/{bucket}/o`, media / multipart / resumable initiation, and the
  resumable `PUT` chunks, whose URL carries the initiation's query) and `GET`/`PATCH`/`DELETE
  /storage/v1/b/{bucket}/o/{object}` answer 412 when `ifGenerationMatch` (0 = must not exist) or
  `ifGenerationNotMatch` does not hold for the object's current generation, as GCS does;
- a read naming a `generation` that is not the current one answers 404 (a bucket without versioning).

The emulator serves one request at a time (http.server.HTTPServer), so the check and the write are atomic.
Not enforced: the XML API, batch requests, copy/rewrite/compose destinations, metageneration conditions.

`python tests/helpers/gcs_preconditions.py PORT BUCKET` runs it; `enforcing_gcs_emulator()` starts it and
points gcsfs at it (STORAGE_EMULATOR_HOST) for the duration.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

BUCKET = "llm-trm-strict"


def _object_name(request: Any, storage: Any) -> tuple[str, str] | None:
    """(bucket, object) that a request addresses, or None."""
    params = request.params or {}
    if "object_id" in params:
        return params["bucket_name"], params["object_id"]
    if "upload_id" in request.query:
        try:
            obj = storage.get_resumable_file_obj(request.query["upload_id"][0])
        except Exception:
            return None
        return obj["bucket"], obj["name"]
    if "name" in request.query:
        return params.get("bucket_name", ""), request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        meta: dict[str, Any] = data["meta"] if isinstance(data.get("meta"), dict) else data
        if meta.get("name"):
            return params.get("bucket_name", ""), str(meta["name"])
    return None


def _failed_precondition(request: Any, storage: Any) -> HTTPStatus | None:
    from gcp_storage_emulator.exceptions import NotFound

    match = request.query.get("ifGenerationMatch", [None])[0]
    not_match = request.query.get("ifGenerationNotMatch", [None])[0]
    wanted = request.query.get("generation", [None])[0] if request.method == "GET" else None
    if match is None and not_match is None and wanted is None:
        return None
    if "softDeleted" in request.query:
        return None
    target = _object_name(request, storage)
    if target is None:
        return None
    try:
        current: str | None = str(storage.get_file_obj(*target)["generation"])
    except NotFound:
        current = None
    if match is not None and not (current is None if match == "0" else current == match):
        return HTTPStatus.PRECONDITION_FAILED
    if not_match is not None and not (current is not None if not_match == "0" else current != not_match):
        return HTTPStatus.PRECONDITION_FAILED
    if wanted is not None and current != wanted:
        return HTTPStatus.NOT_FOUND
    return None


def _enforcing(handler: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        status = _failed_precondition(request, storage)
        if status is None:
            return handler(request, response, storage, *args, **kwargs)
        response.status = status
        reason = "conditionNotMet" if status == HTTPStatus.PRECONDITION_FAILED else "notFound"
        message = "At least one of the pre-conditions you specified did not hold."
        if status == HTTPStatus.NOT_FOUND:
            message = "No such object."
        response.json(
            {"error": {"code": int(status), "message": message, "errors": [{"reason": reason, "message": message}]}}
        )
        return None

    wrapped.__name__ = getattr(handler, "__name__", "handler")
    return wrapped


def patch_emulator() -> None:
    """Wrap the emulator's object handlers (its routing table is read on every request)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    guarded = {
        objects.insert, objects.upload_partial, objects.get, objects.download, objects.delete, objects.patch,
    }  # fmt: skip
    wrapped = {h: _enforcing(h) for h in guarded}
    server.HANDLERS = tuple(
        (regex, {method: wrapped.get(h, h) for method, h in handlers.items()}) for regex, handlers in server.HANDLERS
    )
    objects.insert = wrapped[objects.insert]  # the router's fallback for uploads without the /upload prefix


def serve(port: int, bucket: str) -> None:
    from gcp_storage_emulator.server import create_server

    patch_emulator()
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


@contextlib.contextmanager
def enforcing_gcs_emulator(bucket: str = BUCKET) -> Iterator[str]:
    """Run the enforcing emulator; STORAGE_EMULATOR_HOST points at it meanwhile. Yields its endpoint."""
    from tests.helpers.prefect_server import free_port, wait_for_port  # (this file also runs as a script)

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(port), bucket],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        wait_for_port(port, proc, "the enforcing GCS emulator")
        endpoint = f"http://127.0.0.1:{port}"
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        yield endpoint
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
