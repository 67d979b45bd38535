"""Clients hiervec did not write, generated from the live `/openapi.json` of a running service.

Python: `openapi-python-client` (a dev dependency) generates a package into tmp_path; every
call below goes through that generated code only (its models, its `File`, its clients).
TypeScript: `openapi-typescript` types and `openapi-fetch`, from the npm registry, compiled
with `tsc` and run with Node; skipped with the reason where Node/npm or the registry is missing.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import LEAVES, ingest_catalogue, live_server, png_bytes

pytestmark = pytest.mark.lite
KEY = "k3y-for-clients"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def served(catalogue, tmp_path_factory):
    """A service with an API key over the tiny catalogue, on loopback: (base URL, service)."""
    from service import Service, ServiceSettings

    folder = tmp_path_factory.mktemp("clients")
    service = Service.open(ServiceSettings(lite_process=False, model=str(catalogue.model), uri=str(folder / "clients.db"),
                                           media_dir=str(folder / "media"), image_roots=(str(catalogue.tree),),
                                           api_key=KEY))
    ingest_catalogue(service, catalogue)
    with live_server(service) as url:
        yield url, service


def generate_python_client(url: str, folder: Path, name: str):
    generator = shutil.which("openapi-python-client", path=str(BIN))
    if generator is None:
        pytest.fail("openapi-python-client is a dev dependency (make venv installs it)")
    environment = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # its ruff hooks
    done = subprocess.run([generator, "generate", "--url", f"{url}/openapi.json", "--output-path",
                           str(folder / name), "--meta", "none"], capture_output=True, text=True, timeout=300,
                          env=environment)
    assert done.returncode == 0 and "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def test_a_generated_python_client_searches_uploads_downloads_and_deletes(served, catalogue, tmp_path):
    url, service = served
    package = generate_python_client(url, tmp_path, "hiervec_generated")

    def module(name: str):
        return importlib.import_module(f"hiervec_generated.{name}")

    client, types, models = module("client"), module("types"), module("models")
    search, add_images = module("api.search.search"), module("api.images.add_images")
    get_image, get_image_file = module("api.images.get_image"), module("api.images.get_image_file")
    delete_image, stats = module("api.images.delete_image"), module("api.admin.stats")
    assert package.Client is client.Client
    anonymous = client.Client(base_url=url, raise_on_unexpected_status=True)
    bearer = client.AuthenticatedClient(base_url=url, token=KEY)
    header = client.AuthenticatedClient(base_url=url, token=KEY, prefix="", auth_header_name="X-API-Key")

    # search by an uploaded image, inside one department
    shirt = catalogue.files["clothing/tops/shirt"][0]
    query = types.File(payload=io.BytesIO(shirt.read_bytes()), file_name="query.png", mime_type="image/png")
    found = search.sync(client=anonymous, body=models.BodySearch(image=query, where=["department=clothing"], k=5))
    assert isinstance(found, models.SearchOut), found
    assert found.query["filename"] == "query.png" and len(found.hits) == 5
    assert all(hit.categories["department"] == "clothing" for hit in found.hits)
    assert found.hits[0].id == hashlib.sha256(shirt.read_bytes()).hexdigest() and found.hits[0].distance < 1e-6

    # search by a stored id: it is left out of its own hits
    by_id = search.sync(client=anonymous, body=models.BodySearch(id=found.hits[0].id, k=3))
    assert isinstance(by_id, models.SearchOut) and len(by_id.hits) == 3
    assert found.hits[0].id not in {hit.id for hit in by_id.hits}

    # an upload without the key: 401, parsed into the documented error model
    new = png_bytes(LEAVES["clothing/bottoms/trouser"], seed=999)
    upload = models.BodyAddImages(images=[types.File(payload=io.BytesIO(new), file_name="new.png",
                                                     mime_type="image/png")], category=["clothing/bottoms/trouser"])
    refused = add_images.sync_detailed(client=client.Client(base_url=url), body=upload)
    assert refused.status_code == 401 and isinstance(refused.parsed, models.ErrorOut)
    assert "X-API-Key" in refused.parsed.error.message and "Bearer" in refused.parsed.error.message

    # with the key (as a bearer token), then read it back, its record and its file
    upload.images[0].payload.seek(0)
    stored = add_images.sync(client=bearer, body=upload)
    assert isinstance(stored, models.ImagesOut), stored
    assert stored.stored == 1 and stored.results[0].status == "stored"
    new_id = stored.results[0].id
    record = get_image.sync(new_id, client=anonymous)
    assert isinstance(record, models.HitOut) and record.category == "clothing/bottoms/trouser"
    media = get_image_file.sync(new_id, client=anonymous)
    assert isinstance(media, types.File) and media.payload.read() == new
    typed = stats.sync(client=anonymous)
    assert isinstance(typed, models.StatsOut) and typed.count == len(catalogue.files) * 5 + 1
    assert typed.levels == ["department", "category", "item"] and typed.model.fingerprint == found.model

    # delete with the key in X-API-Key; without it, 401
    assert delete_image.sync_detailed(new_id, client=client.Client(base_url=url)).status_code == 401
    deleted = delete_image.sync(new_id, client=header)
    assert isinstance(deleted, models.DeletedOut) and deleted.deleted == new_id
    gone = get_image.sync_detailed(new_id, client=client.Client(base_url=url))
    assert gone.status_code == 404 and gone.parsed.error.code == "not_found"


TYPESCRIPT_PACKAGES = ("openapi-typescript@7", "openapi-fetch@0.17", "typescript@5", "@types/node@20")

TYPESCRIPT_CLIENT = """
import createClient from "openapi-fetch";
import { readFileSync } from "node:fs";
import type { paths } from "./schema.js";

const [url, key, imagePath] = process.argv.slice(2);
const anonymous = createClient<paths>({ baseUrl: url });
const writer = createClient<paths>({ baseUrl: url, headers: { "X-API-Key": key } });
const image = new Blob([readFileSync(imagePath)], { type: "image/png" });
const multipart = (body: unknown) => {
  const form = new FormData();
  for (const [name, value] of Object.entries(body as Record<string, unknown>)) {
    for (const one of Array.isArray(value) ? value : [value]) {
      if (one instanceof Blob) form.append(name, one, "upload.png");
      else form.append(name, String(one));
    }
  }
  return form;
};

async function main() {
  const out: Record<string, unknown> = {};
  const found = await anonymous.POST("/search", {
    body: { image: image as unknown as string, where: ["department=clothing"], k: 5 },
    bodySerializer: multipart,
  });
  out.search = found.data?.hits.map((hit) => hit.categories["department"]);
  const refused = await anonymous.POST("/images", {
    body: { images: [image as unknown as string], category: ["clothing/bottoms/trouser"] },
    bodySerializer: multipart,
  });
  out.refused = refused.response.status;
  const stored = await writer.POST("/images", {
    body: { images: [image as unknown as string], category: ["clothing/bottoms/trouser"] },
    bodySerializer: multipart,
  });
  const id = stored.data!.results[0].id;
  out.stored = stored.data?.stored;
  const media = await anonymous.GET("/media/{image_id}", { params: { path: { image_id: id } }, parseAs: "arrayBuffer" });
  out.media = media.data ? (media.data as ArrayBuffer).byteLength : null;
  const deleted = await writer.DELETE("/images/{image_id}", { params: { path: { image_id: id } } });
  out.deleted = deleted.data?.deleted === id;
  console.log(JSON.stringify(out));
}
main();
"""


def test_a_typescript_client_from_openapi_typescript_and_openapi_fetch(served, tmp_path):
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("no Node.js here (node and npm): the TypeScript client test needs them")
    url, _ = served
    folder = tmp_path / "ts"
    folder.mkdir()
    (folder / "package.json").write_text(json.dumps({"name": "hiervec-ts-client", "private": True, "type": "module"}))
    try:
        installed = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error",
                                    *TYPESCRIPT_PACKAGES], cwd=folder, capture_output=True, text=True, timeout=300)
        failed = installed.stderr.strip()[-300:] if installed.returncode else None
    except subprocess.TimeoutExpired:
        failed = "no answer within 300 s"
    if failed is not None:
        pytest.skip(f"npm could not install {', '.join(TYPESCRIPT_PACKAGES)} from its registry: {failed}")
    bin_folder = folder / "node_modules" / ".bin"
    typed = subprocess.run([str(bin_folder / "openapi-typescript"), f"{url}/openapi.json", "-o", "schema.d.ts",
                            "--default-non-nullable", "false"],
                           cwd=folder, capture_output=True, text=True, timeout=120)  # form fields with defaults: optional
    assert typed.returncode == 0, typed.stdout + typed.stderr
    schema = (folder / "schema.d.ts").read_text()
    assert "search: {" in schema and "add_images: {" in schema  # the operationIds
    (folder / "client.ts").write_text(TYPESCRIPT_CLIENT)
    compiled = subprocess.run([str(bin_folder / "tsc"), "--strict", "--target", "es2022", "--module", "nodenext",
                               "--moduleResolution", "nodenext", "--skipLibCheck", "client.ts"],
                              cwd=folder, capture_output=True, text=True, timeout=180)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr  # the types fit the calls
    new = tmp_path / "new.png"  # an image the collection does not hold: the upload stores it
    new.write_bytes(png_bytes(LEAVES["clothing/tops/shirt"], seed=1234))
    ran = subprocess.run([node, "client.js", url, KEY, str(new)], cwd=folder, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = json.loads(ran.stdout)
    assert out["search"] == ["clothing"] * 5 and out["refused"] == 401 and out["stored"] == 1
    assert out["media"] == new.stat().st_size and out["deleted"] is True
