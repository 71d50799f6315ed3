"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and exact verification."""

from neuronserve.engine.spec.ngram import NgramProposer
from neuronserve.engine.spec.speculator import (
    DraftRequest,
    SpecDecodeStats,
    Speculator,
    build_speculator,
)
from neuronserve.engine.spec.verify import verify_drafts

__all__ = [
    "DraftRequest",
    "NgramProposer",
    "SpecDecodeStats",
    "Speculator",
    "build_speculator",
    "verify_drafts",
]
