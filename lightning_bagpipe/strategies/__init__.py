"""Lightning strategies of lightning-bagpipe."""

from lightning_bagpipe.strategies.bagpipe import BagpipeStrategy

__all__ = ["BagpipeStrategy"]
