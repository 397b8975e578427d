"""The object store misbehaving, for real: storage survives a flaky store (moto behind a FaultyProxy
answering 503 SlowDown and dropping connections) and fails fast, naming the cause, on what retrying cannot
fix (a missing bucket, an endpoint nobody answers). The proxy itself is checked last."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest
import s3fs

from data_pipeline import storage, store_retry
from data_pipeline.storage import StorageError
from tests.faulty_proxy import FaultyProxy
from tests.helpers import REPO, storage_warnings
from tests.s3_server import free_port

MISSING_BUCKET = "kiln-no-such-bucket"


@pytest.fixture
def flaky(s3, monkeypatch, fresh_s3fs):
    """The moto server behind a proxy answering ~20% of requests 503 SlowDown and dropping ~10%."""
    with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], fail_rate=0.2, drop_rate=0.1, seed=7) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield proxy


@pytest.fixture
def root(s3) -> str:
    """A fresh folder in the test bucket."""
    return f"s3://{s3}/retries-{uuid.uuid4().hex[:8]}"


def round_trip(root: str, count: int = 40, workers: int = 1) -> None:
    """Write, read back, list, walk and remove `count` small objects, checking every answer."""
    names = [f"d{i % 4}/f{i:02d}.txt" for i in range(count)]
    payload = {name: f"{name} {'x' * (i * 50)}" for i, name in enumerate(names)}

    def write(name):
        storage.write_atomic(storage.join(root, name), payload[name])

    def check(name):
        assert storage.read_text(storage.join(root, name)) == payload[name]
        assert storage.exists(storage.join(root, name))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, names))
        list(pool.map(check, names))
    assert storage.list_names(root) == ["d0", "d1", "d2", "d3"]
    assert dict(storage.walk_files(root)) == {name: len(payload[name]) for name in names}
    storage.remove(root, recursive=True)
    assert list(storage.walk_files(root)) == []
    assert not storage.exists(storage.join(root, names[0]))


def test_kiln_retries_alone_carry_every_operation_through_faults(flaky, root, monkeypatch, caplog):
    # botocore and s3fs retry too; switched off here so that our own layer is what gets tested
    conf = fsspec.config.conf["s3"]
    monkeypatch.setitem(
        fsspec.config.conf,
        "s3",
        {**conf, "config_kwargs": {**conf["config_kwargs"], "retries": {"mode": "standard", "total_max_attempts": 1}}},
    )
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setattr(store_retry, "RETRY_BASE_S", 0.01)
    monkeypatch.setenv(store_retry.RETRIES_ENV, "12")

    round_trip(root, workers=4)

    assert flaky.counts.failed > 0 and flaky.counts.dropped > 0
    line = re.compile(
        rf"retrying (write|read|check|list|remove) {re.escape(root)}\S* after "
        r"(SlowDown 503|503|\w+Error: .+) \(attempt \d+/12, waiting \d+\.\d\ds\)$"
    )
    ours = [m for m in storage_warnings(caplog) if line.match(m)]
    assert ours, storage_warnings(caplog)
    assert any("after SlowDown 503" in m for m in ours)


def test_default_layers_carry_folder_transfers_through_faults(flaky, root, tmp_path, caplog):
    # botocore backs off 0-1 s, 0-2 s, 0-4 s... per throttled try: gentler faults keep this test short
    flaky.fail_rate, flaky.drop_rate = 0.1, 0.05
    local = tmp_path / "ckpt"
    files = {f"shards/rank_{i:02d}/part_{j}.bin": os.urandom(1000 + i * 37 + j) for i in range(8) for j in range(4)}
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    assert storage.put_folder(str(local), root + "/ckpt") == sorted(files)
    back = tmp_path / "back"
    assert storage.get_folder(root + "/ckpt", str(back)) == sorted(files)
    assert {rel: (back / rel).read_bytes() for rel in files} == files

    assert flaky.counts.failed > 0 and flaky.counts.dropped > 0
    # botocore's own retries (its DEBUG notices) show up as kiln.storage warnings
    assert any(
        m.startswith("retrying an S3 request after a transient error (botocore") for m in storage_warnings(caplog)
    )


@pytest.mark.parametrize("block_size", [None, 5 << 20], ids=["one-put", "multipart"])
def test_big_file_opened_directly_like_dcp_survives_faults(s3, root, monkeypatch, fresh_s3fs, block_size):
    tries: dict[tuple[str, str], int] = {}

    def first_try_fails(method: str, path: str):
        # every distinct request fails once: dropped or throttled, by turns
        key = (method, path)
        tries[key] = tries.get(key, 0) + 1
        return ("drop", "fail")[len(tries) % 2] if tries[key] == 1 else None

    data = os.urandom(12 << 20)
    url = f"{root}/model.distcp"
    with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], on_request=first_try_fails) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        options = {} if block_size is None else {"block_size": block_size}
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "wb", **options) as handle:  # what torch DCP's FsspecWriter does
            for start in range(0, len(data), 1 << 20):
                handle.write(data[start : start + (1 << 20)])
        with fsspec.open(url, "rb") as handle:
            assert handle.read() == data
    assert proxy.counts.dropped > 0 and proxy.counts.failed > 0
    if block_size:
        assert any("uploadId=" in path for _, path in tries)


def test_a_stream_under_two_parts_is_one_put_and_a_longer_one_a_multipart_upload(s3, root, monkeypatch, fresh_s3fs):
    """As s3fs's own put decides: a multipart upload costs more requests and the store's assembly of the parts."""
    from data_pipeline import transfer

    seen: list[tuple[str, str]] = []
    part = 5 << 20

    def record(method: str, path: str) -> None:
        seen.append((method, path))

    with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], on_request=record) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        fs, folder = fsspec.core.url_to_fs(root)
        for name, size in (("small.distcp", 2 * part - 1), ("large.distcp", 2 * part)):
            data = os.urandom(size)
            seen.clear()
            with transfer.S3PartWriter(fs, f"{folder}/{name}", part_bytes=part) as stream:
                for start in range(0, size, 1 << 20):
                    stream.write(data[start : start + (1 << 20)])
            assert storage.read_bytes(f"{root}/{name}") == data
            multipart = [path for method, path in seen if "uploadId=" in path or "?uploads" in path]
            puts = [path for method, path in seen if method == "PUT" and name in path and "uploadId=" not in path]
            if name == "small.distcp":
                assert not multipart and len(puts) == 1, seen
            else:
                assert len(multipart) == 4 and not puts, seen  # create, two parts, complete


def test_a_checkpoint_file_streamed_in_parts_and_copied_back_in_ranges_survives_faults(
    s3, root, monkeypatch, fresh_s3fs, tmp_path
):
    from data_pipeline import transfer

    tries: dict[tuple[str, str], int] = {}

    def first_try_fails(method: str, path: str):
        key = (method, path)
        tries[key] = tries.get(key, 0) + 1
        return ("drop", "fail")[len(tries) % 2] if tries[key] == 1 else None

    monkeypatch.setattr(transfer, "MIN_PART_BYTES", 5 << 20)
    data = os.urandom(12 << 20)
    url = f"{root}/model.distcp"
    with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], on_request=first_try_fails) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        fs, path = fsspec.core.url_to_fs(url)
        with transfer.S3PartWriter(fs, path, part_bytes=5 << 20) as stream:  # how Kiln's DCP writer uploads
            for start in range(0, len(data), 1 << 20):
                stream.write(data[start : start + (1 << 20)])
        copy = tmp_path / "model.distcp"
        assert storage.sha256_file(url, str(copy)) == hashlib.sha256(data).hexdigest()  # how restore copies
        assert copy.read_bytes() == data
    assert proxy.counts.dropped > 0 and proxy.counts.failed > 0
    assert any("uploadId=" in path for _, path in tries)


@pytest.mark.parametrize(
    "call",
    [
        storage.read_bytes,
        storage.exists,
        storage.list_names,
        lambda url: list(storage.walk_files(url)),
        lambda url: storage.write_atomic(url, b"x"),
        lambda url: storage.remove(url, recursive=True),
    ],
    ids=["read_bytes", "exists", "list_names", "walk_files", "write_atomic", "remove"],
)
def test_missing_bucket_fails_fast_naming_the_url(s3, call, monkeypatch, caplog):
    url = f"s3://{MISSING_BUCKET}/runs/x/run.json"
    waits: list[float] = []
    monkeypatch.setattr(store_retry, "sleep", waits.append)
    with pytest.raises(
        StorageError,
        match=rf"^s3://{MISSING_BUCKET}/runs/x/run.json: bucket '{MISSING_BUCKET}' "
        r"does not exist; create it or fix storage.root",
    ):
        call(url)
    # Fast means on the first answer: neither Kiln nor botocore waited to ask again (no wall clock needed).
    assert waits == [] and storage_warnings(caplog) == []


def test_exists_on_a_missing_bucket_itself_raises(s3):
    with pytest.raises(StorageError, match=f"bucket '{MISSING_BUCKET}' does not exist"):
        storage.exists(f"s3://{MISSING_BUCKET}")
    assert storage.exists(f"s3://{s3}")


@pytest.mark.parametrize(
    "endpoint, reason",
    [
        ("http://no-such-host.invalid:9", "host 'no-such-host.invalid' does not resolve"),
        ("http://127.0.0.1:{port}", "connection refused"),
    ],
    ids=["dns-failure", "connection-refused"],
)
def test_an_unreachable_endpoint_is_permanent_and_named(s3, endpoint, reason, monkeypatch, fresh_s3fs, caplog):
    endpoint = endpoint.format(port=free_port())
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(StorageError) as raised:
        storage.exists("s3://kiln-test/runs/x/run.json")
    message = str(raised.value)
    assert message.startswith(
        f"s3://kiln-test/runs/x/run.json: cannot reach the object store at {endpoint} ({reason}); "
    )
    assert "AWS_ENDPOINT_URL" in message and "\n" not in message
    assert storage_warnings(caplog) == []  # neither botocore nor Kiln retried


def test_proxy_relays_chunked_bodies_and_delays_matching_paths(s3, root):
    data = b"hello chunked world"
    trailer = b"%x\r\n%s\r\n0\r\nx-amz-checksum-crc32:VSRWPg==\r\n\r\n" % (len(data), data)
    seen = []
    with FaultyProxy(
        os.environ["AWS_ENDPOINT_URL"],
        delay_path=r"/slow",
        delay_s=0.3,
        on_request=lambda method, path: seen.append((method, path)),
    ) as proxy:
        conn = http.client.HTTPConnection(*proxy.endpoint[len("http://") :].split(":"))
        key = root.split("/", 3)[3]
        conn.request(
            "PUT",
            f"/{s3}/{key}/chunked",
            body=iter([b"hello ", b"chunked ", b"world"]),
            encode_chunked=True,
            headers={"Transfer-Encoding": "chunked"},
        )
        chunked = conn.getresponse()
        chunked.read()
        assert chunked.status == 200
        conn.request(
            "PUT",
            f"/{s3}/{key}/slow/aws-chunked",
            body=trailer,
            headers={
                "Content-Encoding": "aws-chunked",
                "x-amz-decoded-content-length": str(len(data)),
                "x-amz-trailer": "x-amz-checksum-crc32",
                "X-Amz-Content-Sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            },
        )
        response = conn.getresponse()
        response.read()
        assert response.status == 200  # and it was held first: counts.delayed below
        conn.close()
    assert storage.read_bytes(f"{root}/chunked") == data
    assert storage.read_bytes(f"{root}/slow/aws-chunked") == data
    assert seen == [("PUT", f"/{s3}/{key}/chunked"), ("PUT", f"/{s3}/{key}/slow/aws-chunked")]
    assert (proxy.counts.forwarded, proxy.counts.delayed) == (2, 1)


def test_proxy_runs_as_a_process(s3):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.faulty_proxy",
            "--target",
            os.environ["AWS_ENDPOINT_URL"],
            "--port",
            "0",
            "--fail-rate",
            "1",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = proc.stdout.readline().strip()
        conn = http.client.HTTPConnection(*endpoint[len("http://") :].split(":"), timeout=10)
        conn.request("GET", f"/{s3}/anything")
        response = conn.getresponse()
        assert response.status == 503 and b"<Code>SlowDown</Code>" in response.read()
        conn.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert json.loads(out.strip().splitlines()[-1])["failed"] == 1
