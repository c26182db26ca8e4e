"""A store on a real S3-compatible server (moto in server mode on loopback) through s3fs; index local."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from cachecard import Match, Store
from cachecard.testing import make_identity, make_kv

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")
IDENT = make_identity()


@pytest.fixture(scope="module")
def s3():
    """Start moto's S3 server on a free loopback port; yield storage options for s3fs; stop it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=opts["endpoint_url"], region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="cards-bucket")
    try:
        yield opts
    finally:
        import gc

        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # drop s3fs clients now, under this module's warning filters
        gc.collect()
        server.stop()


def test_remote_store_put_match_load_share_delete_and_reindex(s3, tmp_path):
    url = "s3://cards-bucket/memory"
    kv = make_kv(tokens=120)
    ids = np.arange(2000, 2120)
    with Store(url, index=tmp_path / "index", storage_options=s3, block_tokens=32) as st:
        a = st.put(kv, ids, IDENT, agent="alice")
        more = make_kv(tokens=30, seed=3)
        kv2 = type(kv)(np.concatenate([kv.k, more.k], axis=2), np.concatenate([kv.v, more.v], axis=2))
        b = st.put(kv2, np.arange(2000, 2150), IDENT, agent="bob")
        assert st.load(b).equal(kv2)  # two cards, read in parallel over S3
        assert st.match(np.arange(2000, 2200), IDENT) == Match(b, 150)
        part = st.load(st.match(np.arange(2000, 2100), IDENT), layers=0)
        assert np.array_equal(part.k, kv.k[:1, :, :96])
        st.handoff(a, "carol")
        assert st.verify().ok == 2
        before = [(c.card_id, c.agents, c.total) for c in st.cards()]
    fs = __import__("s3fs").S3FileSystem(**s3)
    assert fs.exists(f"cards-bucket/memory/cards/{a[:2]}/{a}/zarr.json")
    assert fs.exists(f"cards-bucket/memory/refs/carol/{a}")
    # another machine: an empty index, rebuilt from the remote manifests and refs
    with Store(url, index=tmp_path / "other-index", storage_options=s3) as st:
        assert st.cards() == []
        rep = st.reindex()
        assert rep.cards == 2 and not rep.skipped
        assert [(c.card_id, c.agents, c.total) for c in st.cards()] == before
        assert st.load(st.match(np.arange(2000, 2150), IDENT, agent="bob")).equal(kv2)
        assert st.drop_agent("bob") == [b]
        assert st.drop_agent("alice") == [] and st.drop_agent("carol") == [a]
        assert st.cards() == [] and not fs.find("cards-bucket/memory/cards")
        assert st.gc(grace_s=0).orphans_deleted == []
