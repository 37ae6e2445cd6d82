"""Who may talk to bigglm's clusters: TLS credentials, loopback listeners, private files.

Everything here runs real components: schedulers and worker processes of distributed,
TLS handshakes, the ``dask worker`` command, sockets read back with psutil. The SLURM
versions of the refusal checks are in ``test_slurm.py``.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bigglm.cluster import client_from_profile
from bigglm.config import ClusterConfig, parse_section
from bigglm.exceptions import ConfigError
from bigglm.security import address_security, batch_security, private_folder

LOOPBACK = {"127.0.0.1", "::1"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- private folders and credential files -------------------------------------------------


def test_private_folder_is_0700_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        made = private_folder(tmp_path / "a" / "state")
    finally:
        os.umask(previous)
    assert _mode(made) == 0o700


def test_private_folder_tightens_an_existing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    (folder / "kept.json").write_text("{}")
    assert _mode(private_folder(folder)) == 0o700
    assert (folder / "kept.json").read_text() == "{}"  # contents untouched


def test_private_folder_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a folder")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        private_folder(tmp_path / "state")


def test_batch_credentials_are_private_files_removed_at_the_end(tmp_path: Path) -> None:
    with batch_security(True, tmp_path / "credentials") as security:
        files = [Path(security.tls_ca_file), Path(security.tls_worker_cert)]
        files.append(Path(security.tls_worker_key))
        folder = files[0].parent
        assert folder.parent == tmp_path / "credentials" and folder.name.startswith("bigglm-tls-")
        assert _mode(folder) == 0o700 and _mode(folder.parent) == 0o700
        assert all(_mode(p) == 0o600 for p in files)
        assert "PRIVATE KEY" in files[2].read_text()
        assert security.require_encryption
        worker = security.get_tls_config_for_role("worker")
        assert all("\n" not in str(value) for value in worker.values())  # paths, never PEM text
    assert not folder.exists()
    assert list((tmp_path / "credentials").iterdir()) == []


def test_batch_credentials_are_removed_after_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with batch_security(True, tmp_path) as security:
            folder = Path(security.tls_ca_file).parent
            raise RuntimeError("boom")
    assert not folder.exists()


def test_only_the_credential_files_are_removed(tmp_path: Path) -> None:
    with batch_security(True, tmp_path) as security:
        folder = Path(security.tls_ca_file).parent
        (folder / "notes.txt").write_text("not bigglm's")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_tls_opt_out_writes_nothing(tmp_path: Path) -> None:
    with batch_security(False, tmp_path / "credentials") as security:
        assert security is None
    assert not (tmp_path / "credentials").exists()


# --- mutual authentication on a real scheduler --------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """A scheduler and one worker process speaking TLS with batch (file) credentials."""
    from distributed import LocalCluster

    parent = tmp_path_factory.mktemp("credentials")
    with (
        batch_security(True, parent) as security,
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            security=security,
        ) as cluster,
    ):
        yield cluster, security


@pytest.mark.cluster
def test_a_client_with_the_run_credentials_computes(tls_cluster: tuple[Any, Any]) -> None:
    from distributed import Client

    cluster, security = tls_cluster
    assert cluster.scheduler_address.startswith("tls://")
    with Client(cluster.scheduler_address, security=security, timeout="10s") as client:
        assert client.submit(sum, [1, 2]).result() == 3


@pytest.mark.cluster
def test_plain_tcp_is_refused(tls_cluster: tuple[Any, Any]) -> None:
    from distributed import Client

    cluster, _ = tls_cluster
    with pytest.raises(OSError):  # distributed's CommClosedError is an OSError
        Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout="5s")


@pytest.mark.cluster
def test_a_client_with_another_authoritys_certificate_is_refused(
    tls_cluster: tuple[Any, Any], tmp_path: Path, foreign_credentials: Any
) -> None:
    """The impostor trusts the scheduler's CA (that certificate is not a secret), so the
    refusal is the scheduler's: it requires a client certificate signed by the run's CA."""
    from distributed import Client, Security

    cluster, security = tls_cluster
    other = foreign_credentials(tmp_path, security.tls_ca_file)
    impostor = Security(
        tls_ca_file=other["ca"],
        tls_client_cert=other["cert"],
        tls_client_key=other["key"],
        require_encryption=True,
    )
    with pytest.raises(OSError):  # the handshake fails: no client object is made
        Client(cluster.scheduler_address, security=impostor, timeout="5s")


@pytest.mark.cluster
def test_a_client_without_a_certificate_is_refused(tls_cluster: tuple[Any, Any]) -> None:
    """distributed cannot even make a TLS client without a certificate, so this peer is a
    plain TLS socket: it verifies the scheduler (the handshake completes), then the
    scheduler, which requires a client certificate, closes the connection.

    Under TLS 1.3 the client's side of the handshake ends before the scheduler has checked
    for a certificate, so the refusal reaches this peer as the scheduler's TLS alert
    (ssl.SSLError), as a reset of the connection (when the alert is overtaken by the close),
    or as the end of the stream: any of those is a refusal; a byte of reply is not."""
    cluster, security = tls_cluster
    host, port = cluster.scheduler_address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=security.tls_ca_file)
    context.check_hostname = False  # the run's certificate names no host, as in distributed
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            assert tls.version() is not None  # the scheduler's certificate was accepted
            try:
                tls.sendall(b"\0" * 8)
                reply = tls.recv(1)
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                reply = b""
            assert reply == b"", "the scheduler answered a client without a certificate"


@pytest.mark.cluster
@pytest.mark.parametrize("certificate", ["none", "another authority's"])
def test_a_worker_started_by_hand_cannot_join(
    tls_cluster: tuple[Any, Any],
    tmp_path: Path,
    certificate: str,
    foreign_credentials: Any,
    hand_started_worker: Any,
) -> None:
    from distributed import Client

    cluster, security = tls_cluster
    files = None
    if certificate != "none":
        files = foreign_credentials(tmp_path, security.tls_ca_file)
    done = hand_started_worker(cluster.scheduler_address, files)
    assert done.returncode != 0, done.stderr[-2000:]
    with Client(cluster.scheduler_address, security=security, timeout="10s") as client:
        assert len(client.scheduler_info()["workers"]) == 1  # only the cluster's own


@pytest.mark.cluster
def test_a_worker_with_the_run_credentials_joins(tls_cluster: tuple[Any, Any]) -> None:
    """The control for the refusals above: the same command with the run's files joins."""
    from distributed import Client

    cluster, security = tls_cluster
    files = ["--tls-ca-file", security.tls_ca_file, "--tls-cert", security.tls_worker_cert]
    command = [str(Path(sys.executable).with_name("dask")), "worker", cluster.scheduler_address]
    worker = subprocess.Popen(
        [*command, "--no-nanny", *files, "--tls-key", security.tls_worker_key],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Client(cluster.scheduler_address, security=security, timeout="10s") as client:
            client.wait_for_workers(2, timeout=60)
    finally:
        worker.terminate()
        worker.wait(timeout=30)


# --- what a local cluster started by bigglm listens on ------------------------------------


#: Run in a fresh interpreter, so that the process tree holds bigglm's cluster only (the
#: test process has other listeners: fixtures' clusters, pytest plugins).
_LISTENERS = """
import json, os, sys
import psutil
from bigglm.cluster import client_from_profile
from bigglm.config import ClusterConfig, parse_section

if __name__ == "__main__":
    profile = parse_section(ClusterConfig, json.loads(sys.argv[1]))
    with client_from_profile(profile) as client:
        me = psutil.Process()
        listening = [
            (each.pid, conn.laddr.ip, conn.laddr.port)
            for each in [me, *me.children(recursive=True)]
            # net_connections from psutil 6; connections before (the oldest supported)
            for conn in (
                each.net_connections if hasattr(each, "net_connections") else each.connections
            )(kind="inet")
            if conn.status == psutil.CONN_LISTEN
        ]
        print(json.dumps({
            "listening": listening,
            "me": os.getpid(),
            "workers": sorted(client.run(os.getpid).values()),
            "worker_addresses": sorted(client.scheduler_info()["workers"]),
            "scheduler": client.scheduler.address,
            "dashboard": client.dashboard_link,
        }))
"""


def _listeners(section: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "listeners.py"
    script.write_text(_LISTENERS)
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(section)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


@pytest.mark.cluster
def test_local_cluster_listens_on_loopback_only_and_speaks_tls(tmp_path: Path) -> None:
    found = _listeners({"n_workers": 2}, tmp_path)
    listening = found["listening"]
    assert found["scheduler"].startswith("tls://127.0.0.1:")
    assert all(address.startswith("tls://127.0.0.1:") for address in found["worker_addresses"])
    dashboard_port = int(found["dashboard"].split(":")[2].split("/")[0])
    assert found["dashboard"].startswith("http://127.0.0.1:")
    assert dashboard_port in {port for _, _, port in listening}
    pids = {pid for pid, _, _ in listening}
    assert len(found["workers"]) == 2 and {found["me"], *found["workers"]} <= pids  # all seen
    assert {ip for _, ip, _ in listening} <= LOOPBACK, listening


@pytest.mark.cluster
def test_local_cluster_opt_out_is_plain_tcp_on_loopback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    found = _listeners({"n_workers": 1, "security": {"tls": False}}, tmp_path)
    assert found["scheduler"].startswith("tcp://127.0.0.1:")
    assert {ip for _, ip, _ in found["listening"]} <= LOOPBACK
    profile = parse_section(ClusterConfig, {"n_workers": 1, "security": {"tls": False}})
    with client_from_profile(profile):
        pass
    assert "security.tls is false" in caplog.text


def test_the_dashboard_log_line_tells_how_to_reach_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="bigglm.cluster")
    with client_from_profile(ClusterConfig(n_workers=1)) as client:
        port = client.dashboard_link.split(":")[2].split("/")[0]
    assert f"ssh -L {port}:localhost:{port} " in caplog.text


# --- joining a scheduler by address -------------------------------------------------------


@pytest.mark.cluster
def test_address_profile_joins_a_tls_scheduler_with_given_files(
    tls_cluster: tuple[Any, Any],
) -> None:
    cluster, security = tls_cluster
    section = {
        "profile": "address",
        "address": cluster.scheduler_address,
        "security": {
            "ca_file": security.tls_ca_file,
            "cert": security.tls_client_cert,
            "key": security.tls_client_key,
        },
    }
    with client_from_profile(parse_section(ClusterConfig, section)) as client:
        assert client.submit(pow, 2, 5).result() == 32


def test_plain_tcp_to_another_machine_warns() -> None:
    with pytest.warns(UserWarning, match="without TLS: anyone who can reach that port"):
        address_security("tcp://10.1.2.3:8786", ca_file=None, cert=None, key=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for local in ("tcp://127.0.0.1:8786", "tcp://localhost:8786", "tcp://[::1]:8786"):
            assert address_security(local, ca_file=None, cert=None, key=None) is None


def test_a_tls_address_without_a_certificate_is_one_message() -> None:
    with pytest.raises(ConfigError, match="is a TLS scheduler, but no client certificate"):
        address_security("tls://10.1.2.3:8786", ca_file=None, cert=None, key=None)


@pytest.mark.cluster
def test_fit_command_joins_a_tls_scheduler_with_its_files(
    tls_cluster: tuple[Any, Any], tiny_store: tuple[Path, Path], tmp_path: Path
) -> None:
    cluster, security = tls_cluster
    store, events = tiny_store
    command = [sys.executable, "-m", "bigglm.cli", "fit", str(store), "--events", str(events)]
    command += ["--contrast", "a=a", "--address", cluster.scheduler_address]
    bare = subprocess.run(
        [*command, "--output", str(tmp_path / "bare")], capture_output=True, text=True, timeout=300
    )
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert "is a TLS scheduler, but no client certificate" in bare.stderr.strip().splitlines()[0]
    files = ["--tls-ca-file", security.tls_ca_file, "--tls-cert", security.tls_client_cert]
    files += ["--tls-key", security.tls_client_key, "--output", str(tmp_path / "maps")]
    done = subprocess.run([*command, *files], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "maps" / "contrast-a_stat-z_statmap.nii.gz").is_file()


def test_address_security_checks_its_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cluster\.security\.cert: .* does not exist"):
        address_security("tls://h:1", ca_file=None, cert=tmp_path / "c.pem", key=tmp_path / "k")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"profile": "address", "address": "tls://h:1", "security": {"tls": False}},
            "security.tls only apply to clusters bigglm starts",
        ),
        ({"security": {"ca_file": "ca.pem"}}, "security.ca_file only apply to profile 'address'"),
        ({"security": {"directory": "/x"}}, "security.directory only applies to batch"),
        (
            {"profile": "address", "address": "tls://h:1", "security": {"cert": "c.pem"}},
            "give 'cert' and 'key' together",
        ),
    ],
)
def test_security_settings_that_do_not_fit_the_profile(
    section: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_section(ClusterConfig, section)


def test_the_dashboard_binds_to_loopback_by_default() -> None:
    from bigglm.cluster import jobqueue_options, local_options

    assert local_options(ClusterConfig())["dashboard_address"] == "127.0.0.1:0"
    batch = jobqueue_options(ClusterConfig(profile="slurm"))
    assert batch["scheduler_options"]["dashboard_address"] == "127.0.0.1:0"
    opened = parse_section(ClusterConfig, {"dashboard_address": ":8787"})
    assert local_options(opened)["dashboard_address"] == ":8787"  # the user asked for it


@pytest.mark.parametrize("kind", ["slurm", "pbs", "sge"])
def test_batch_jobs_name_the_credential_files_only(tmp_path: Path, kind: str) -> None:
    import dask_jobqueue

    from bigglm.cluster import jobqueue_options

    cls = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}[kind]
    with batch_security(True, tmp_path) as security:
        options = jobqueue_options(ClusterConfig(profile=kind), security)
        assert options["protocol"] == "tls://"
        with getattr(dask_jobqueue, cls)(**options) as cluster:  # renders; submits nothing
            script = cluster.job_script()
            assert cluster.scheduler_address.startswith("tls://")
        key = Path(security.tls_worker_key).read_text()
    assert f"--tls-key {security.tls_worker_key}" in script
    assert "PRIVATE KEY" not in script and key.splitlines()[1] not in script


def test_an_existing_credentials_parent_keeps_its_mode_and_contents(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o755)
    (parent / "data.nii").write_bytes(b"\0" * 10)
    with batch_security(True, parent) as security:
        assert _mode(Path(security.tls_ca_file).parent) == 0o700
    assert [p.name for p in parent.iterdir()] == ["data.nii"] and _mode(parent) == 0o755
