"""Management API endpoints of the cluster's artifact repository (docs/repository.md).

Thin handlers over the node's `ArtifactService` (`node.artifacts`, aether.repository.service):

- `GET /api/v1/repository/artifacts[?project=P]` every wheel's manifest; `DELETE
  /api/v1/repository/artifacts/{project}/{version}` removes a version;
- `PUT /api/v1/repository/files/{filename}?sha256=HEX` uploads a wheel (the body is the wheel's
  bytes, streamed, never buffered whole: the server's middleware leaves it to the handler, which
  meters it against the repository's size limit); `GET` the same path downloads it;
- `GET /api/v1/repository/simple/` and `/simple/{project}/`: the PEP 503 (HTML) / PEP 691 (JSON)
  index pip installs from (`pip install --index-url http://HOST:PORT/api/v1/repository/simple/ NAME`);
- `GET|PUT|DELETE /api/v1/repository/maven/{group path}/{artifact}/...`: the Maven-style subset
  (`maven-metadata.xml` lists versions; `{version}/{file}` downloads or uploads; `DELETE
  {version}/` removes a version).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final, TypeVar

import aiohttp
import msgspec
from aiohttp import web
from packaging.utils import canonicalize_name
from packaging.version import Version as PepVersion

from aether.api.common import API_PREFIX, json_response, query
from aether.api.routing import Answer, Body, Route, path_param, query_param
from aether.core.artifact import Artifact
from aether.core.errors import BadRequest, RequestTimeout
from aether.kv.keys import ArtifactManifest
from aether.repository import core
from aether.repository.errors import ArtifactMissing
from aether.repository.service import ArtifactService

__all__ = ["ROUTES", "SIMPLE_PATH", "RepositoryRoutes", "Uploaded"]

P: Final = f"{API_PREFIX}/repository"
SIMPLE_PATH: Final = f"{P}/simple/"
_TAGS = ("repository",)
_READ_SIZE: Final = 256 * 1024
DEFAULT_IDLE: Final = 10.0


class Uploaded(msgspec.Struct):
    """An upload's answer: the stored manifest; `created` false when these bytes were there already."""

    created: bool
    manifest: ArtifactManifest


_H = TypeVar("_H")


def streams_body(handler: _H) -> _H:
    """Mark a handler that reads its request body itself (the middleware must not buffer it)."""
    handler.streams_body = True  # type: ignore[attr-defined]
    return handler


class RepositoryRoutes:
    def __init__(self, service: ArtifactService, *, idle_timeout: float = DEFAULT_IDLE) -> None:
        self.service = service
        self.idle_timeout = idle_timeout

    # --- helpers ------------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> AsyncIterator[bytes]:
        """The request body as it arrives; 408 if the client sends nothing for `idle_timeout`; a
        400 (logged as one line, not as an internal error) if the client closes the connection
        before the body's end."""
        received = 0
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    data = await request.content.read(_READ_SIZE)
            except TimeoutError:
                raise RequestTimeout(f"no upload data received for {self.idle_timeout:g} s") from None
            except (ConnectionError, aiohttp.ClientPayloadError) as e:
                self.service.log.info(
                    "upload %s cut off after %d bytes (%s); nothing was stored", request.path, received, e
                )
                raise BadRequest(
                    f"the upload was cut off after {received} bytes (the connection closed: {e}); "
                    "nothing was stored"
                ) from None
            if not data:
                return
            received += len(data)
            yield data

    async def _upload(
        self, request: web.Request, filename: str, expected: Artifact | None = None
    ) -> web.Response:
        params = query(request, ("sha256",))
        sha = params.get("sha256") or request.headers.get("X-Checksum-Sha256")
        manifest, created = await self.service.upload(
            self._body(request), filename, declared=request.content_length, sha256=sha, expected=expected
        )
        return json_response(Uploaded(created, manifest), 201 if created else 200)

    async def _download(self, request: web.Request, manifest: ArtifactManifest) -> web.StreamResponse:
        chunks = self.service.chunks(manifest)
        first = await anext(chunks)  # an unreadable wheel answers 503 before the headers go out
        resp = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(manifest.size),
                "Content-Disposition": f'attachment; filename="{manifest.filename}"',
                "X-Checksum-Sha256": manifest.sha256,
                "ETag": f'"{manifest.sha256}"',
            }
        )
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        await resp.write(first)
        async for data in chunks:
            await resp.write(data)
        await resp.write_eof()
        return resp

    def _by_filename(self, filename: str) -> ArtifactManifest:
        project, version = core.wheel_filename(filename)
        m = self.service.manifest(project, version)
        if m is None or m.filename != filename:
            raise ArtifactMissing(f"{filename} is not in the cluster's repository")
        return m

    # --- JSON API -----------------------------------------------------------------------------------

    async def list_artifacts(self, request: web.Request) -> web.Response:
        project = query(request, ("project",)).get("project")
        found = self.service.manifests()
        if project is not None:
            found = [m for m in found if m.project == canonicalize_name(project)]
        return json_response(sorted(found, key=lambda m: (m.project, PepVersion(m.version))))

    async def delete_artifact(self, request: web.Request) -> web.Response:
        project = canonicalize_name(request.match_info["project"])
        removed = await self.service.delete(project, request.match_info["version"])
        return json_response(removed)

    @streams_body
    async def put_file(self, request: web.Request) -> web.Response:
        return await self._upload(request, request.match_info["filename"])

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        return await self._download(request, self._by_filename(request.match_info["filename"]))

    # --- simple index ------------------------------------------------------------------------------

    async def simple_root(self, request: web.Request) -> web.Response:
        fmt = core.negotiate(request.headers.get("Accept"), query(request, ("format",)).get("format"))
        body, ctype = core.simple_root((m.project for m in self.service.manifests()), fmt)
        return web.Response(body=body, headers={"Content-Type": ctype, "Vary": "Accept"})

    async def simple_project(self, request: web.Request) -> web.Response:
        fmt = core.negotiate(request.headers.get("Accept"), query(request, ("format",)).get("format"))
        given = request.match_info["project"]
        project = canonicalize_name(given)
        if project != given:  # PEP 503: redirect to the normalised name
            raise web.HTTPMovedPermanently(f"{SIMPLE_PATH}{project}/")
        files = self.service.project(project)
        if not files:
            raise ArtifactMissing(f"no project {project!r} in the cluster's repository")
        body, ctype = core.simple_project(project, files, lambda m: f"{P}/files/{m.filename}", fmt)
        return web.Response(body=body, headers={"Content-Type": ctype, "Vary": "Accept"})

    # --- Maven-style paths -------------------------------------------------------------------------

    async def maven_get(self, request: web.Request) -> web.StreamResponse:
        mp = core.parse_maven_path(request.match_info["path"])
        manifests = self.service.manifests()
        versions = core.slice_versions(manifests, mp.name)
        if mp.metadata:
            if not versions:
                raise ArtifactMissing(f"no versions of {mp.name} in the cluster's repository")
            xml = core.maven_metadata(mp.group, mp.artifact, versions)
            return web.Response(text=xml, content_type="application/xml")
        m = core.find_slice(manifests, mp.coords())
        if m is None:
            raise ArtifactMissing(f"{mp.coords()} is not in the cluster's repository")
        if mp.filename is None:
            return json_response([m])
        if mp.filename != m.filename:
            raise ArtifactMissing(f"{mp.coords()} has no file {mp.filename!r} (it has {m.filename})")
        return await self._download(request, m)

    @streams_body
    async def maven_put(self, request: web.Request) -> web.Response:
        mp = core.parse_maven_path(request.match_info["path"])
        if mp.filename is None:
            raise BadRequest("PUT needs a file path: GROUP/PATH/ARTIFACT/VERSION/FILE.whl")
        return await self._upload(request, mp.filename, mp.coords())

    async def maven_delete(self, request: web.Request) -> web.Response:
        mp = core.parse_maven_path(request.match_info["path"])
        if mp.metadata:
            raise BadRequest("DELETE needs a version: GROUP/PATH/ARTIFACT/VERSION/")
        m = core.find_slice(self.service.manifests(), mp.coords())
        if m is None or (mp.filename is not None and mp.filename != m.filename):
            raise ArtifactMissing(f"{mp.coords()} is not in the cluster's repository")
        return json_response(await self.service.delete(m.project, m.version))


_WHEEL = Answer({"type": "string", "format": "binary"}, "The wheel's bytes", media="application/octet-stream")
_UPLOAD_BODY = Body(
    {"type": "string", "format": "binary"},
    "The wheel's bytes (streamed; at most the repository's upload limit)",
    alternatives={"application/octet-stream": {"type": "string", "format": "binary"}},
)
_UPLOADED = {201: Answer(Uploaded, "Stored"), 200: Answer(Uploaded, "These bytes were stored already")}
_UPLOAD_ERRORS = (400, 408, 409, 413, 503, 504)
_UPLOAD_DESCRIPTIONS = {
    400: "Not a wheel, a corrupt wheel, a sha256 mismatch, or a name or version that is not the wheel's own",
    409: "The version exists with other content",
    413: "Larger than the repository's upload limit",
}
_SHA = query_param(
    "sha256", "The sha256 (hex) of the bytes sent; a mismatch is refused", pattern="^[0-9a-fA-F]{64}$"
)
_MAVEN_PATH = path_param("path", "GROUP/PATH/ARTIFACT/maven-metadata.xml, .../VERSION/ or .../VERSION/FILE")
_HTML = "text/html"

ROUTES: Final[list[Route]] = [
    Route(
        "GET",
        f"{P}/artifacts",
        RepositoryRoutes.list_artifacts,
        "listRepositoryArtifacts",
        "Every wheel in the cluster's repository (manifests)",
        {200: Answer(list[ArtifactManifest], "Manifests")},
        (400,),
        tags=_TAGS,
        params=(query_param("project", "Only this project (distribution name)"),),
    ),
    Route(
        "DELETE",
        f"{P}/artifacts/{{project}}/{{version}}",
        RepositoryRoutes.delete_artifact,
        "deleteRepositoryArtifact",
        "Remove a version from the cluster's repository",
        {200: Answer(ArtifactManifest, "The removed manifest")},
        (400, 404, 409, 503, 504),
        role="operate",
        params=(path_param("project", "Distribution name"), path_param("version", "Version")),
        tags=_TAGS,
    ),
    Route(
        "PUT",
        f"{P}/files/{{filename}}",
        RepositoryRoutes.put_file,
        "uploadWheel",
        "Upload a wheel (slice or library) into the cluster's repository",
        _UPLOADED,
        _UPLOAD_ERRORS,
        role="operate",
        body=_UPLOAD_BODY,
        tags=_TAGS,
        params=(path_param("filename", "The wheel's file name"), _SHA),
        descriptions=_UPLOAD_DESCRIPTIONS,
    ),
    Route(
        "GET",
        f"{P}/files/{{filename}}",
        RepositoryRoutes.get_file,
        "downloadWheel",
        "Download a wheel",
        {200: _WHEEL},
        (400, 404, 503),
        params=(path_param("filename", "The wheel's file name"),),
        tags=_TAGS,
    ),
    Route(
        "GET",
        SIMPLE_PATH,
        RepositoryRoutes.simple_root,
        "simpleIndex",
        "PEP 503 / PEP 691 simple index: every project",
        {200: Answer({"type": "string"}, "HTML (PEP 503) or JSON (PEP 691, by Accept)", media=_HTML)},
        (400,),
        params=(query_param("format", "html or json (else by Accept)"),),
        tags=_TAGS,
    ),
    Route(
        "GET",
        f"{SIMPLE_PATH}{{project}}/",
        RepositoryRoutes.simple_project,
        "simpleProject",
        "PEP 503 / PEP 691 simple index: one project's wheels (with sha256)",
        {200: Answer({"type": "string"}, "HTML (PEP 503) or JSON (PEP 691, by Accept)", media=_HTML)},
        (400, 404),
        params=(
            path_param("project", "Distribution name"),
            query_param("format", "html or json (else by Accept)"),
        ),
        tags=_TAGS,
    ),
    Route(
        "GET",
        f"{P}/maven/{{path:.+}}",
        RepositoryRoutes.maven_get,
        "mavenGet",
        "Maven-style path: maven-metadata.xml (versions), a version, or a wheel file",
        {200: Answer({"type": "string"}, "XML, JSON or the wheel", media="application/xml")},
        (400, 404, 503),
        params=(_MAVEN_PATH,),
        tags=_TAGS,
    ),
    Route(
        "PUT",
        f"{P}/maven/{{path:.+}}",
        RepositoryRoutes.maven_put,
        "mavenPut",
        "Maven-style upload of a slice wheel to GROUP/PATH/ARTIFACT/VERSION/FILE",
        _UPLOADED,
        _UPLOAD_ERRORS,
        role="operate",
        body=_UPLOAD_BODY,
        params=(_MAVEN_PATH, _SHA),
        tags=_TAGS,
        descriptions=_UPLOAD_DESCRIPTIONS,
    ),
    Route(
        "DELETE",
        f"{P}/maven/{{path:.+}}",
        RepositoryRoutes.maven_delete,
        "mavenDelete",
        "Maven-style delete of GROUP/PATH/ARTIFACT/VERSION/",
        {200: Answer(ArtifactManifest, "The removed manifest")},
        (400, 404, 409, 503, 504),
        role="operate",
        params=(_MAVEN_PATH,),
        tags=_TAGS,
    ),
]
