"""The `local` target: `melanoma-dist cv` (or `tune`) in this process, on an embedded Ray started for it."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from melanoma_dist.config import Config
from melanoma_dist.submit.command import Command

logger = logging.getLogger(__name__)


def run_local(cfg: Config, args: argparse.Namespace, command: Command) -> int:
    """Run the cross-validation of `cfg` (or the smoke test, or the search) on a Ray started on this machine.

    `command` is the CLI command to run (`cli.cmd_cv` or `cli.cmd_tune`), given by the caller.
    """
    if args.smoke_test:
        from melanoma_dist.submit.smoke import CLASS_SIZES, smoke_config

        if args.config is not None:
            raise ValueError("--smoke-test brings its own data and config: drop --config (--set still applies)")
        workdir = Path(tempfile.mkdtemp(prefix="melanoma-smoke-"))
        cfg = smoke_config(workdir, args.overrides)
        logger.info("smoke test: %d generated images, 2 folds, 1 epoch, in %s", sum(CLASS_SIZES.values()), workdir)
    # "Local" means an embedded Ray even when a cluster address is configured.
    if os.environ.pop("RAY_ADDRESS", None):
        logger.info("ignoring RAY_ADDRESS: the local target starts its own Ray (use `launch ray` for a cluster)")
    if cfg.distributed.address:
        logger.info("ignoring distributed.address=%s: the local target starts its own Ray", cfg.distributed.address)
        cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, address=""))
    return command(cfg, argparse.Namespace(folds=args.folds, address=None, nested=args.nested, resume=False))
