"""A side collection beside the images: one row per photo, keyed by ``image_id``, with one
text field (a thumbnail, a content hash). Milvus wants a vector field in every collection,
so each row carries a 2-d dummy vector. The collection is created on its first write, so an
index made before it existed gets it then."""
from __future__ import annotations

from delf_common.contract import MAX_ID_BYTES

DUMMY = [0.0, 0.0]


class KeyedCollection:
    """``image_id`` -> ``field`` (a VARCHAR of at most ``max_length`` bytes) in the
    collection ``name`` (``client``: the store's MilvusClient)."""

    field = ""
    max_length = 0

    def __init__(self, client, name: str):
        self.client = client
        self.name = name
        self.exists = client.has_collection(name)
        if self.exists:
            client.load_collection(name)

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("image_id", DataType.VARCHAR, max_length=MAX_ID_BYTES, is_primary=True)
        s.add_field(self.field, DataType.VARCHAR, max_length=self.max_length)
        s.add_field("dummy", DataType.FLOAT_VECTOR, dim=len(DUMMY))
        ip = self.client.prepare_index_params()
        ip.add_index("dummy", index_type="FLAT", metric_type="L2")
        self.client.create_collection(self.name, schema=s, index_params=ip, consistency_level="Strong")
        self.client.load_collection(self.name)
        self.exists = True
