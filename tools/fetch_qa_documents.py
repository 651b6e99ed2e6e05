"""Fetch the documents of `quire bench qa` from Debian's mirror and check them.

    .venv/bin/python tools/fetch_qa_documents.py [--out bench-data/qa] [--mirror URL]

For each entry of resources/bench/qa/documents.json: download the .deb (kept in
OUT/debs, reused when its sha256 matches), check its sha256, take the member file
out of its data archive (a .deb is an `ar` archive holding data.tar.xz; read here
with the standard library, so no dpkg is needed), gunzip it where the entry says
so, and check the file's sha256. The documents are never committed: they are
third-party works, fetched at set-up time.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent.parent / "resources" / "bench" / "qa" / "documents.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ar_members(data: bytes) -> dict[str, bytes]:
    """The members of an `ar` archive: "!<arch>\\n", then per member a 60-byte header
    (name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2, ASCII) and its data,
    padded to an even length."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (.deb)")
    members, at = {}, 8
    while at + 60 <= len(data):
        header = data[at : at + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[at + 60 : at + 60 + size]
        at += 60 + size + (size % 2)
    return members


def extract(deb: bytes, member: str) -> bytes:
    for name, payload in ar_members(deb).items():
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as archive:
                for candidate in (member, "./" + member):
                    try:
                        handle = archive.extractfile(candidate)
                    except KeyError:
                        continue
                    if handle is not None:
                        return handle.read()
            raise KeyError(f"{member} is not in the package")
    raise ValueError("the .deb holds no data archive")


def fetch(out: Path, mirror: str, manifest: dict) -> list[str]:
    debs = out / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    problems = []
    for doc in manifest["documents"]:
        target = out / doc["file"]
        if target.is_file() and sha256(target.read_bytes()) == doc["sha256"]:
            print(f"{doc['key']}: present")
            continue
        cached = debs / Path(doc["path"]).name
        data = cached.read_bytes() if cached.is_file() else b""
        if sha256(data) != doc["deb_sha256"]:
            url = mirror.rstrip("/") + "/" + doc["path"].replace("+", "%2b")
            print(f"{doc['key']}: downloading {url}", flush=True)
            with urllib.request.urlopen(url, timeout=120) as response:
                data = response.read()
            if sha256(data) != doc["deb_sha256"]:
                problems.append(f"{doc['key']}: {doc['package']} {doc['version']} does not match its sha256")
                continue
            cached.write_bytes(data)
        content = extract(data, doc["member"])
        if doc.get("gunzip"):
            content = gzip.decompress(content)
        if sha256(content) != doc["sha256"]:
            problems.append(f"{doc['key']}: {doc['member']} does not match its sha256")
            continue
        target.write_bytes(content)
        print(f"{doc['key']}: {target} ({len(content):,} bytes)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-data/qa", help="folder for the documents (default: bench-data/qa)")
    parser.add_argument("--mirror", default=None, help="Debian mirror (default: the manifest's)")
    args = parser.parse_args(argv)
    manifest = json.loads(MANIFEST.read_text())
    problems = fetch(Path(args.out), args.mirror or manifest["mirror"], manifest)
    for problem in problems:
        print("error:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
