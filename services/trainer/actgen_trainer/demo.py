"""``make demo``: the whole loop on a laptop, nothing to download.

Starts a private redis-server and one generator replica with the tiny SD-architecture model
trained on the digits (``models/tiny-digits``, loaded like SD 2.1), trains ``configs/demo.yaml`` (scikit-learn digits, a small CNN) in ``actgen`` mode, writes
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
DEMO_MODEL = "models/tiny-digits"


def _in_repo(relative: str) -> Path:
    """A file of the repository: from the working directory, else from the package's location."""
    here = Path.cwd() / relative
    if here.exists():
        return here
    return Path(__file__).resolve().parents[3] / relative  # repo root from the package


def _config_path(given: str | None) -> Path:
    return Path(given) if given else _in_repo(DEMO_CONFIG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actgen_trainer.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help=f"config file (default {DEMO_CONFIG})")
    parser.add_argument("--model", help=f"generator model (default {DEMO_MODEL}; 'tiny' for random weights)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    cfg = load_config(_config_path(args.config), args.overrides)
    model = None if args.model == "tiny" else str(Path(args.model) if args.model else _in_repo(DEMO_MODEL))
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # the demo always starts from scratch
    cfg.run_dir.mkdir(parents=True)
    started = time.perf_counter()

    print("[demo] starting a private redis-server ...", flush=True)
    with EmbeddedRedis() as redis_server:
        print(
            f"[demo] redis at {redis_server.url}; starting a generator with {model or 'the tiny model'} "
            f"(log: {cfg.run_dir / 'generator.log'}) ...",
            flush=True,
        )
        with GeneratorProcess(
            redis_url=redis_server.url, model=model, log_path=cfg.run_dir / "generator.log"
        ) as gen:
            print(
                f"[demo] generator ready at {gen.url} after {time.perf_counter() - started:.0f}s; "
                f"training {cfg.train.epochs} epochs ({cfg.generation.mode.value} mode, "
                f"{cfg.generation.images_per_epoch} hard samples per epoch in the first "
                f"{cfg.generation_epochs})",
                flush=True,
            )
            with GeneratorClient(gen.url, timeout_s=cfg.generation.request_timeout_s) as client:
                cfg = cfg.model_copy(
                    update={"generation": cfg.generation.model_copy(update={"generator_url": gen.url})}
                )
                summary = Trainer(cfg, client=client, progress=True).run()
        print("[demo] generator and redis stopped", flush=True)

    print(f"[demo] report: {summary.report.resolve() if summary.report else cfg.run_dir}")
    print(f"[demo] {summary.line()} | wall {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
