"""Who may talk to the Dask clusters bigglm starts: TLS with mutual authentication.

A Dask scheduler runs whatever Python a connected client sends, and a worker that joins
receives the user's data. On a machine shared with other users, and every HPC login and
compute node is one, a scheduler without authentication lets anyone who can reach its
port act as the user. So every cluster bigglm starts uses TLS in both directions: the
scheduler, the workers and bigglm's client each present a certificate signed by a
certificate authority made for this run only, and each refuses a peer that does not
(distributed's TLS contexts require the peer's certificate).

- A ``local`` cluster keeps its credentials in memory (:meth:`distributed.Security.temporary`):
  its worker processes are spawned by this process and receive them directly.
- A batch cluster (``slurm``, ``pbs``, ``sge``) has workers that start on other machines,
  so the credentials are written to a folder they can read on the shared filesystem: a
  fresh folder of mode 0700 holding files of mode 0600, created by this run, named in the
  job scripts by path only (never by content), and removed when the run ends.
- A scheduler joined by ``address`` uses the certificate paths given in the profile, or
  Dask's own ``distributed.comm.tls`` configuration; connecting over plain ``tcp://`` to
  another machine warns.

The opt-out, ``cluster.security.tls: false``, is for sites whose network is private to
one user by other means (a job's own network namespace, a firewall per user); bigglm then
starts plain ``tcp://`` clusters, as Dask does by default.

bigglm's own bookkeeping (the ``.bigglm`` state folder, job scripts, job logs, the
credentials) is made readable by the user only, whatever the umask; the results (maps,
stores, reports) follow the user's umask, so that a lab group can share them as it chooses.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from bigglm.exceptions import ConfigError

__all__ = ["address_security", "batch_security", "local_security", "private_folder"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
#: The roles a batch cluster's credentials serve; one key and certificate serves all.
_ROLES = ("client", "scheduler", "worker")
#: The prefix of a per-run credentials folder, so that a reader knows what it is.
CREDENTIALS_PREFIX = "bigglm-tls-"
#: Default parent of the per-run credentials folders when no outputs folder is known.
DEFAULT_CREDENTIALS = Path("~") / ".bigglm" / "credentials"


def private_folder(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) readable by the user only; return it.

    The folder itself gets mode 0700 whatever the umask, also when it already exists
    and belongs to this user (an earlier version may have made it with the umask's mode).
    Parents that this call creates get the umask's mode: only the last folder is private.

    Parameters
    ----------
    path : path
        A folder bigglm owns (its ``.bigglm`` state, job scripts, logs, credentials).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ConfigError
        If ``path`` exists but is not a folder, or belongs to another user.

    Examples
    --------
    >>> import tempfile, stat
    >>> folder = private_folder(Path(tempfile.mkdtemp()) / "state")
    >>> oct(stat.S_IMODE(folder.stat().st_mode))
    '0o700'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} exists and is not a folder; move it away")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{path} belongs to another user (uid {info.st_uid}); bigglm keeps its state "
            "private, so choose an outputs folder of your own"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def local_security(enabled: bool) -> Any:
    """TLS for a ``local`` cluster: credentials in memory only, or ``None`` when disabled.

    Parameters
    ----------
    enabled : bool
        ``cluster.security.tls``.

    Returns
    -------
    distributed.Security or None

    Examples
    --------
    >>> local_security(True).require_encryption
    True
    >>> local_security(False) is None
    True
    """
    from distributed import Security

    return Security.temporary() if enabled else None


@contextmanager
def batch_security(enabled: bool, parent: str | os.PathLike[str]) -> Iterator[Any]:
    """Per-run TLS credentials for a batch cluster, as files its workers can read.

    A new folder ``<parent>/bigglm-tls-XXXXXXXX`` (mode 0700) receives the certificate
    authority, certificate and key of :meth:`distributed.Security.temporary` as files of
    mode 0600; on exit those files and the folder are removed (nothing else: a file that
    someone else put there stays, and so does the folder then).

    Parameters
    ----------
    enabled : bool
        ``cluster.security.tls``; when false, yields ``None`` and writes nothing.
    parent : path
        A folder on the filesystem the workers share (created with mode 0700 if missing;
        an existing folder is left as it is, since the run's own folder is private).

    Yields
    ------
    distributed.Security or None
        File-based credentials for every role, encryption required.

    Examples
    --------
    >>> import tempfile
    >>> parent = Path(tempfile.mkdtemp())
    >>> with batch_security(True, parent) as security:
    ...     folder = Path(security.tls_ca_file).parent
    ...     sorted(p.name for p in folder.iterdir()), oct(folder.stat().st_mode & 0o777)
    (['ca.pem', 'cert.pem', 'key.pem'], '0o700')
    >>> folder.exists()
    False
    """
    if not enabled:
        yield None
        return
    from distributed import Security

    memory = Security.temporary()
    parent = Path(parent)
    if not parent.exists():  # an existing folder keeps its mode: the run's own is 0700
        private_folder(parent)
    folder = Path(tempfile.mkdtemp(prefix=CREDENTIALS_PREFIX, dir=parent))
    written: list[Path] = []
    try:
        contents = {
            "ca.pem": memory.tls_ca_file,
            "cert.pem": memory.tls_worker_cert,
            "key.pem": memory.tls_worker_key,
        }
        paths = {
            name: _write_private(folder / name, text, written) for name, text in contents.items()
        }
        options = {"tls_ca_file": str(paths["ca.pem"])}
        for role in _ROLES:
            options[f"tls_{role}_cert"] = str(paths["cert.pem"])
            options[f"tls_{role}_key"] = str(paths["key.pem"])
        logger.debug("TLS credentials for this run in %s", folder)
        yield Security(require_encryption=True, **options)
    finally:
        _remove_credentials(folder, written)


def _write_private(path: Path, text: str, written: list[Path]) -> Path:
    """Write ``text`` to a new file of mode 0600 (never over an existing one)."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written.append(path)
    with os.fdopen(handle, "w") as out:
        out.write(text)
    return path


def _remove_credentials(folder: Path, written: list[Path]) -> None:
    for path in written:
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # something that is not ours is in it: leave it, and say so
        logger.warning("left %s in place: it holds files bigglm did not write", folder)


def address_security(
    address: str, *, ca_file: PathLike | None, cert: PathLike | None, key: PathLike | None
) -> Any:
    """The credentials to join a running scheduler with.

    With ``cert`` and ``key`` (and usually ``ca_file``) given: those files, encryption
    required. Otherwise ``None``: distributed then reads Dask's own configuration
    (``distributed.comm.tls.*``), where a site may keep its certificates. Joining over
    plain ``tcp://`` a scheduler that is not on this machine's loopback warns: anyone on
    that network can then submit code to it.

    Parameters
    ----------
    address : str
        The scheduler's address, ``tls://host:port`` or ``tcp://host:port``.
    ca_file, cert, key : path, optional
        PEM files: the certificate authority, the client's certificate and its key.

    Returns
    -------
    distributed.Security or None

    Raises
    ------
    ConfigError
        If a file is missing, a certificate comes without its key, or a ``tls://``
        address has no client certificate here or in Dask's configuration.

    Examples
    --------
    >>> address_security("tcp://127.0.0.1:8786", ca_file=None, cert=None, key=None) is None
    True
    """
    if (cert is None) != (key is None):
        raise ConfigError(
            "cluster.security: give 'cert' and 'key' together (the client's certificate "
            "and its private key)"
        )
    for name, value in (("ca_file", ca_file), ("cert", cert), ("key", key)):
        if value is not None and not Path(value).expanduser().is_file():
            raise ConfigError(f"cluster.security.{name}: {value} does not exist; check the path")
    scheme, _, rest = address.partition("://")
    if scheme in ("tcp", "") and not _is_loopback(rest or address):
        warnings.warn(
            f"connecting to the Dask scheduler at {address} without TLS: anyone who can "
            "reach that port can run code as you; start it with TLS (dask scheduler "
            "--tls-ca-file ...) and give cluster.security's ca_file, cert and key",
            UserWarning,
            stacklevel=3,
        )
    import dask
    from distributed import Security

    if cert is None:
        if scheme == "tls" and not dask.config.get("distributed.comm.tls.client.cert", None):
            raise ConfigError(
                f"{address} is a TLS scheduler, but no client certificate is given; set "
                "cluster.security's ca_file, cert and key (or Dask's distributed.comm.tls "
                "configuration)"
            )
        return None

    files = {"tls_client_cert": _expanded(cert), "tls_client_key": _expanded(key)}
    if ca_file is not None:
        files["tls_ca_file"] = _expanded(ca_file)
    return Security(require_encryption=True, **files)


def _expanded(path: PathLike | None) -> str:
    return str(Path(path or "").expanduser())


def _is_loopback(host_port: str) -> bool:
    """Whether ``host:port`` (or ``[v6]:port``) names this machine's loopback."""
    host = host_port.rsplit(":", 1)[0] if host_port.count(":") == 1 else host_port
    if host.startswith("["):
        host = host[1 : host.index("]")]
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False
