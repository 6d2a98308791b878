"""Seeded requests whose prompt is chunked, on vLLM's CPU runner.

A prompt chunk before the last samples a token that is then discarded, and vLLM rewinds the request's generator
by ``gen.set_offset(gen.get_offset() - 4)``. CPU generators have no offset (``RuntimeError: CPU Generator does not
use offset``), so on CPU the whole batch fails, with the default scheduler too. RAPID seeds every random-sampling
request (``rapid.reproducible_sampling``), so this would fail every long prompt on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def spare_generators_of_discarded_samples(runner: Any) -> Iterator[None]:
    """While ``runner`` samples its prepared step, take the generators of requests whose sample is discarded out of
    the batch: that sample comes from the default generator, and the request's own generator is untouched (an exact
    rewind, where vLLM's offset arithmetic is not possible)."""
    batch = runner.input_batch
    discarded = np.nonzero(runner.discard_request_mask.np[: batch.num_reqs])[0]
    held = {int(i): batch.generators.pop(int(i)) for i in discarded if int(i) in batch.generators}
    try:
        yield
    finally:
        batch.generators.update(held)
