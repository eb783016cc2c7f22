"""``make demo``: the whole loop on a laptop, nothing to download.

Starts a private redis-server and one generator replica with the tiny SD-architecture model,
trains ``configs/demo.yaml`` (scikit-learn digits, a small CNN) in ``actgen`` mode, writes
``runs/demo/report.html``, stops what it started, and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from actgen_shared.client import GeneratorClient
from actgen_shared.launcher import GeneratorProcess
from actgen_shared.redis_embedded import EmbeddedRedis

from actgen_trainer.config import load_config
from actgen_trainer.loop import Trainer

DEMO_CONFIG = "configs/demo.yaml"


def _config_path(given: str | None) -> Path:
    if given:
        return Path(given)
    here = Path.cwd() / DEMO_CONFIG
    if here.is_file():
        return here
    return Path(__file__).resolve().parents[3] / DEMO_CONFIG  # repo root from the package


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actgen_trainer.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help=f"config file (default {DEMO_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    cfg = load_config(_config_path(args.config), args.overrides)
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # the demo always starts from scratch
    cfg.run_dir.mkdir(parents=True)
    started = time.perf_counter()

    print("[demo] starting a private redis-server ...", flush=True)
    with EmbeddedRedis() as redis_server:
        print(f"[demo] redis at {redis_server.url}; starting a generator with the tiny model "
              f"(log: {cfg.run_dir / 'generator.log'}) ...", flush=True)
        with GeneratorProcess(redis_url=redis_server.url, log_path=cfg.run_dir / "generator.log") as gen:
            print(f"[demo] generator ready at {gen.url} after {time.perf_counter() - started:.0f}s; "
                  f"training {cfg.train.epochs} epochs ({cfg.generation.mode.value} mode, "
                  f"{cfg.generation.images_per_epoch} hard samples per epoch in the first "
                  f"{cfg.generation_epochs})", flush=True)
            with GeneratorClient(gen.url, timeout_s=cfg.generation.request_timeout_s) as client:
                cfg = cfg.model_copy(update={"generation": cfg.generation.model_copy(
                    update={"generator_url": gen.url})})
                summary = Trainer(cfg, client=client, progress=True).run()
        print("[demo] generator and redis stopped", flush=True)

    print(f"[demo] report: {summary.report.resolve() if summary.report else cfg.run_dir}")
    print(f"[demo] {summary.line()} | wall {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
