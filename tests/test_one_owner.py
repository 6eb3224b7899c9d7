"""Issue 22, item 1: one owner per address. gRPC's default SO_REUSEPORT let a second
gateway bind an address another one serves, and the kernel split clients between two
unrelated systems. Now the gateway refuses a served address with a message naming it and
how to pick another, and a second `delf up` on it exits at once, before starting anything,
while the first keeps serving."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import grpc
import pytest

from conftest import free_port, redis_db_url, system_env
from delf_common import config
from delf_common.addresses import address_in_use

REFUSE_WITHIN_S = 10.0


@pytest.fixture
def listener():
    """A socket listening on a port of 127.0.0.1, as another server would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_a_served_address_is_seen_as_taken_and_a_free_one_is_not(listener):
    assert address_in_use(listener)
    assert address_in_use(listener.replace("127.0.0.1", "0.0.0.0"))  # the wildcard covers it
    assert not address_in_use(f"127.0.0.1:{free_port()}")
    assert not address_in_use("127.0.0.1:0")


def test_the_gateway_refuses_an_address_another_grpc_server_serves(monkeypatch):
    """Another gRPC server with gRPC's defaults (SO_REUSEPORT on) holds the port: before,
    the gateway bound it too; now building the gateway fails with a message to act on."""
    from concurrent import futures

    from delf_gateway.server import AddressInUse, build_server

    for name in config.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DELF_REDIS_URL", redis_db_url())
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        with pytest.raises(AddressInUse) as refused:
            build_server(f"127.0.0.1:{port}")
        message = str(refused.value)
        assert f"127.0.0.1:{port}" in message and "DELF_GRPC_ADDR" in message and "DELF_GATEWAY" in message
        assert isinstance(refused.value, config.ConfigError)  # main() exits 2 with it, no traceback
    finally:
        other.stop(0)


@pytest.mark.slow
def test_a_second_delf_up_on_a_served_address_exits_at_once_and_the_first_keeps_serving(system, client,
                                                                                       tmp_path):
    before = client.stats()
    env = system_env(tmp_path)  # another system: its own data dir and queues
    env.pop("DELF_REDIS_URL")   # and its own embedded broker, were it to start one
    began = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "delf_tools.launcher", "--data-dir", str(tmp_path / "data"),
         "--grpc-addr", system.address, "--redis-port", "0", "--ready-file", str(tmp_path / "ready")],
        env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - began
    output = second.stdout + second.stderr
    assert second.returncode != 0 and took < REFUSE_WITHIN_S, (second.returncode, took, output)
    assert system.address in output and "--grpc-addr" in output, output
    assert "Traceback" not in output and "DELF is up" not in output, output
    assert not (tmp_path / "ready").exists() and not (tmp_path / "data" / "redis").exists()  # nothing started
    # The first system serves every request, as before.
    for _ in range(20):
        assert client.stats().images == before.images
    assert system.proc.poll() is None


@pytest.mark.slow
def test_a_second_gateway_process_on_a_served_address_exits_with_the_address(system, client):
    env = system_env(system.root / "second-gateway", DELF_GRPC_ADDR=system.address)
    began = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "delf_gateway"], env=env, capture_output=True, text=True,
                            timeout=60)
    output = second.stdout + second.stderr
    assert second.returncode == 2 and time.monotonic() - began < REFUSE_WITHIN_S, (second.returncode, output)
    assert f"{system.address} is already served by another process" in output, output
    assert "Traceback" not in output, output
    assert client.stats().images >= 0 and system.proc.poll() is None
