"""Logging set-up shared by the command line and the workers it starts."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    """Our progress at INFO (DEBUG when verbose); other libraries only from WARNING.

    Horovod's rendezvous server logs every key exchange at INFO on the root
    logger, which would drown the progress lines.
    """
    logging.basicConfig(level=logging.WARNING, format=FORMAT, datefmt="%H:%M:%S")
    logging.getLogger("melanoma_dist").setLevel(logging.DEBUG if verbose else logging.INFO)
