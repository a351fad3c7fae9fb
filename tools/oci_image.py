#!/usr/bin/env python3
"""Package the filter as the OCI image Istio pulls, without Docker (stdlib only).

    python3 tools/oci_image.py WASM OUT_DIR [--name idempotency-filter] [--tag VERSION]

writes
    OUT_DIR/NAME/          an OCI image layout (oci-layout, index.json, blobs/sha256/...)
    OUT_DIR/NAME.tar       the same layout as one archive (skopeo's "oci-archive:")
and prints the manifest digest: the value for the `sha256` field of a WasmPlugin or of the
EnvoyFilter's remote code source (Istio checks an OCI module against its manifest digest).

The image is what `docker build` makes of `FROM scratch` + `COPY plugin.wasm ./` (see the
Dockerfile): one gzipped tar layer holding `plugin.wasm`, with OCI media types. Istio's puller
takes the last layer of such an image ("compat" variant, media type
application/vnd.oci.image.layer.v1.tar+gzip) and reads the file named plugin.wasm from it.

Everything is deterministic (no timestamps, fixed owners and modes): the same module gives the
same digests, so a rebuild that changed nothing is recognisably the same image.

Push it with any OCI registry client, e.g.
    skopeo copy oci:OUT_DIR/NAME:TAG docker://REGISTRY/NAME:TAG
    crane push OUT_DIR/NAME REGISTRY/NAME:TAG
"""

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
PLUGIN_NAME = "plugin.wasm"
WASM_MAGIC = b"\0asm"


def _tar_entry(tar, name, data, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _tar_dir(tar, name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info)


def layer_tar(wasm):
    """The uncompressed layer: one file, plugin.wasm, at the image root."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _tar_entry(tar, PLUGIN_NAME, wasm)
    return out.getvalue()


def gzip_bytes(data):
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return out.getvalue()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def cargo_version(root):
    text = (root / "Cargo.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return match.group(1) if match else "latest"


def build(wasm, name, tag):
    """{blob digest: bytes} and the manifest digest for the image of one module."""
    if not wasm.startswith(WASM_MAGIC):
        raise ValueError("not a WebAssembly module (no \\0asm magic)")
    layer = layer_tar(wasm)
    layer_gz = gzip_bytes(layer)
    config = canonical_json({
        # What a FROM scratch image built on amd64 carries; Istio ignores the platform of a
        # single-manifest image, and registries and tools that insist on one are satisfied.
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": digest(layer_gz), "size": len(layer_gz)}],
        "annotations": {
            "org.opencontainers.image.title": name,
            "org.opencontainers.image.version": tag,
            "org.opencontainers.image.description": "Idempotency-Key proxy-wasm filter for Envoy and Istio",
        },
    })
    blobs = {digest(b): b for b in (layer_gz, config, manifest)}
    return blobs, digest(manifest), len(manifest)


def write_layout(out_dir, name, tag, blobs, manifest_digest, manifest_size):
    """The layout directory and its archive; returns both paths."""
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_TYPE,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    })
    files = {"oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"}), "index.json": index}
    for blob_digest, data in blobs.items():
        files["blobs/sha256/" + blob_digest.split(":", 1)[1]] = data

    layout = out_dir / name
    shutil.rmtree(layout, ignore_errors=True)
    for rel, data in files.items():
        path = layout / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    archive = out_dir / f"{name}.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        _tar_dir(tar, "blobs")
        _tar_dir(tar, "blobs/sha256")
        for rel in sorted(files):
            _tar_entry(tar, rel, files[rel])
    return layout, archive


def main(argv=None):
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wasm", type=Path, help="the built module")
    parser.add_argument("out_dir", type=Path, help="where the layout and the archive go")
    parser.add_argument("--name", default="idempotency-filter")
    parser.add_argument("--tag", default=None, help="default: the crate version in Cargo.toml")
    args = parser.parse_args(argv)
    tag = args.tag or cargo_version(root)

    blobs, manifest_digest, manifest_size = build(args.wasm.read_bytes(), args.name, tag)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    layout, archive = write_layout(args.out_dir, args.name, tag, blobs, manifest_digest, manifest_size)
    print(f"OCI image layout  {layout} (tag {tag})")
    print(f"OCI archive       {archive}")
    print(f"manifest digest   {manifest_digest}")
    print("push:             skopeo copy oci:%s:%s docker://REGISTRY/%s:%s" % (layout, tag, args.name, tag))
    print("Istio sha256:     %s" % manifest_digest.split(":", 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
