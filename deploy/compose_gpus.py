"""Write a compose override with one generator service per GPU (GPU i -> replica i).

Compose cannot give `--scale` replicas distinct device ids nor tell a replica its index
(docker/compose issues 11863 and 9153), so each GPU gets a service of its own, extending the
`generator` service of docker-compose.yml (GPU 0); each waits for Redis and for `model-init` (the
one-shot fetch of the model into the shared volume), written out since `extends` need not carry
depends_on.

    python deploy/compose_gpus.py 4 > docker-compose.gpus.yml
    docker compose -f docker-compose.yml -f docker-compose.gpus.yml up -d
"""

from __future__ import annotations

import argparse
import sys


def render(num_gpus: int, first_port: int = 8001) -> str:
    """Override YAML for GPUs 1..num_gpus-1 (GPU 0 is the base file's `generator`)."""
    header = "# Written by deploy/compose_gpus.py: one generator replica per GPU.\n"
    if num_gpus == 1:
        return header + "services: {}\n"
    lines = ["services:"]
    for gpu in range(1, num_gpus):
        lines += [
            f"  generator-gpu{gpu}:",
            "    extends:",
            "      file: docker-compose.yml",
            "      service: generator",
            "    environment:",
            f"      ACTGEN_REPLICA_ID: generator-gpu{gpu}",
            "    depends_on:",
            "      redis:",
            "        condition: service_healthy",
            "      model-init:",
            "        condition: service_completed_successfully",
            "    ports: !override",
            f'      - "${{ACTGEN_BIND:-127.0.0.1}}:{first_port + gpu - 1}:8000"',
            "    deploy:",
            "      resources:",
            "        reservations:",
            "          devices: !override",
            "            - driver: nvidia",
            f'              device_ids: ["{gpu}"]',
            "              capabilities: [gpu]",
        ]
    return header + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("num_gpus", type=int, help="GPUs on this machine (one replica each)")
    parser.add_argument("--first-port", type=int, default=8001, help="host port of replica 1")
    args = parser.parse_args(argv)
    if args.num_gpus < 1:
        parser.error(f"num_gpus must be at least 1, got {args.num_gpus}")
    sys.stdout.write(render(args.num_gpus, args.first_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
