"""Layer and image records as earlier layerfs versions wrote them decode, and encode back to the
very same bytes: the typed records change nothing on disk (docs/FORMAT.md)."""

from __future__ import annotations

import json

import pytest

from layerfs.store import Store
from layerfs.store.records import ImageRecord, LayerRecord

# written by layerfs at 408bee2 (import of a two-layer OCI layout, then a commit on top)
LAYER_IMPORTED = (
    b'{"blob_digest": "sha256:50b4a38aa2489226fdcf29c336836f97a87e49caa49bc0404cc1427d8a0da32a", '
    b'"blob_size": 102, "compression": "gzip", "created": 1795997374.7693183, '
    b'"diff_id": "sha256:ea0629d5183e84e1eff235ad82fd00545f42e0d6406429c8ae5850b37556ecb4", '
    b'"entries": 1, "files": 1, "size": 5, '
    b'"skeleton": "cffb8e48cd7b055b41122c97ea5d23c88d500fa0e35cac16c5e0de6f88a4c728", '
    b'"table": "ba2fb4aa59ccb27823c00d414d640dc5dee12863554fd2a425f4f327b96d651b", "tar_size": 10240}'
)
LAYER_COMMITTED = (
    b'{"blob_digest": "sha256:a0402d059139eae50607ed818d99bb488bce1a0040595ad463694014953b88d5", '
    b'"blob_size": 2048, "compression": "none", "created": 1795997374.783681, '
    b'"diff_id": "sha256:a0402d059139eae50607ed818d99bb488bce1a0040595ad463694014953b88d5", '
    b'"entries": 1, "files": 1, "size": 1, '
    b'"skeleton": "e22770444e8adf93a4dff5c74ab4d56a15e3f7a004bb924e441ad8d2d47fc1de", '
    b'"table": "27bc462d2a510794147085cf066af59cbda1d22c7a0f081e137396c92b8f4a90", "tar_size": 2048}'
)
# as the first layerfs wrote layers: no tar_size, no skeleton
LAYER_OLDEST = (
    b'{"blob_digest": "sha256:50b4a38aa2489226fdcf29c336836f97a87e49caa49bc0404cc1427d8a0da32a", '
    b'"blob_size": 102, "compression": "gzip", "created": 1795997374.7693183, '
    b'"diff_id": "sha256:ea0629d5183e84e1eff235ad82fd00545f42e0d6406429c8ae5850b37556ecb4", '
    b'"entries": 1, "files": 1, "size": 5, '
    b'"table": "ba2fb4aa59ccb27823c00d414d640dc5dee12863554fd2a425f4f327b96d651b"}'
)
IMAGE_IMPORTED = (
    b'{"blobs": ["807db53a666c031e2f645739ddf65557a06f7725931e17b453d985f583740774", '
    b'"f414d89e7f9984a4896d5861129be64fba2b9ec72bd08d3379e9110550869d42"], '
    b'"config": "807db53a666c031e2f645739ddf65557a06f7725931e17b453d985f583740774", "created": "", '
    b'"imported": 1795997374.7727401, "layer_descriptors": ['
    b'{"digest": "sha256:50b4a38aa2489226fdcf29c336836f97a87e49caa49bc0404cc1427d8a0da32a", '
    b'"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 102}, '
    b'{"digest": "sha256:378afd177249837c361b6bfcdbff153194c96d88116ef57d11d57d9c0517f14d", '
    b'"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 103}], '
    b'"layers": ["ea0629d5183e84e1eff235ad82fd00545f42e0d6406429c8ae5850b37556ecb4", '
    b'"84355349c1fc8979e064410c7c4f55304dc98542208b186a9f5a8b01ad6361df"], '
    b'"manifest": "f414d89e7f9984a4896d5861129be64fba2b9ec72bd08d3379e9110550869d42", '
    b'"manifest_media_type": "application/vnd.oci.image.manifest.v1+json", "platform": "linux/amd64", '
    b'"size": 10, "source": "/tmp/rec-capture/img"}'
)
IMAGE_COMMITTED = (
    b'{"blobs": ["67cc46c20cdeec13f9c3c1b7345e24ee3aefb0625be415bfc06ed07da7720b3b", '
    b'"07d775624a0e1da6e649219ea80c37982c36e94d16e0f9462ee3bfde34fdbb1c"], '
    b'"config": "67cc46c20cdeec13f9c3c1b7345e24ee3aefb0625be415bfc06ed07da7720b3b", '
    b'"created": "2026-11-30T00:09:34.779026Z", "imported": 1795997374.783828, "layer_descriptors": ['
    b'{"digest": "sha256:ea0629d5183e84e1eff235ad82fd00545f42e0d6406429c8ae5850b37556ecb4", '
    b'"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": 10240}, '
    b'{"digest": "sha256:84355349c1fc8979e064410c7c4f55304dc98542208b186a9f5a8b01ad6361df", '
    b'"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": 10240}, '
    b'{"digest": "sha256:a0402d059139eae50607ed818d99bb488bce1a0040595ad463694014953b88d5", '
    b'"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": 2048}], '
    b'"layers": ["ea0629d5183e84e1eff235ad82fd00545f42e0d6406429c8ae5850b37556ecb4", '
    b'"84355349c1fc8979e064410c7c4f55304dc98542208b186a9f5a8b01ad6361df", '
    b'"a0402d059139eae50607ed818d99bb488bce1a0040595ad463694014953b88d5"], '
    b'"manifest": "07d775624a0e1da6e649219ea80c37982c36e94d16e0f9462ee3bfde34fdbb1c", '
    b'"manifest_media_type": "application/vnd.oci.image.manifest.v1+json", "platform": "linux/amd64", '
    b'"size": 11, "source": "commit"}'
)


@pytest.mark.parametrize("data", [LAYER_IMPORTED, LAYER_COMMITTED, LAYER_OLDEST])
def test_layer_records_round_trip(data: bytes) -> None:
    rec = LayerRecord.decode(data)
    assert rec.encode() == data
    assert rec.as_json() == json.loads(data)
    assert rec.table == bytes.fromhex(json.loads(data)["table"])


def test_oldest_layer_record_has_no_tar_size_or_skeleton() -> None:
    rec = LayerRecord.decode(LAYER_OLDEST)
    assert (rec.tar_size, rec.skeleton) == (None, None)
    assert LayerRecord.decode(LAYER_IMPORTED).skeleton == bytes.fromhex(
        "cffb8e48cd7b055b41122c97ea5d23c88d500fa0e35cac16c5e0de6f88a4c728"
    )


@pytest.mark.parametrize("data", [IMAGE_IMPORTED, IMAGE_COMMITTED])
def test_image_records_round_trip(data: bytes) -> None:
    rec = ImageRecord.decode(data)
    assert rec.encode() == data
    raw = json.loads(data)
    assert [h.hex() for h in rec.layers] == raw["layers"]
    assert (rec.config.hex(), rec.manifest.hex(), rec.size) == (raw["config"], raw["manifest"], raw["size"])


def test_a_store_holding_older_records_reads_them(store: Store) -> None:
    """Records put into the store byte for byte as earlier versions wrote them come back typed,
    and what reads them whole (``layers --json``) sees what is on disk."""
    layers = {
        "ea0629d5183e84e1eff235ad82fd00545f42e0d6406429c8ae5850b37556ecb4": LAYER_OLDEST,
        "a0402d059139eae50607ed818d99bb488bce1a0040595ad463694014953b88d5": LAYER_COMMITTED,
    }
    image_id = bytes.fromhex("67cc46c20cdeec13f9c3c1b7345e24ee3aefb0625be415bfc06ed07da7720b3b")

    def put(txn) -> None:  # type: ignore[no-untyped-def]
        for h, data in layers.items():
            txn.put(bytes.fromhex(h), data, db=store.db("layers"))
        txn.put(image_id, IMAGE_COMMITTED, db=store.db("images"))

    store.write(put)
    assert {k.hex(): rec.encode() for k, rec in store.layers()} == layers
    image = store.get_image(image_id)
    assert image is not None and image.encode() == IMAGE_COMMITTED
    assert [k for k, _ in store.images()] == [image_id]
    with store.read() as txn:
        assert bytes(txn.get(image_id, db=store.db("images"))) == IMAGE_COMMITTED
