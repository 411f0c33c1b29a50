"""Context parallelism: one session's context spread over the ranks of a torch.distributed group.

The sequence's KV lives in contiguous slices, one per rank (``ContextSlices``); the weights are
replicated and every rank runs every chunk through every layer (the recurrent state is the same
on every rank), but each rank keeps only the keys of its slice and attends only to them:

- span search: each rank scores the candidate anchors it holds and takes its own top-k; an
  all-gather of those ``world * k`` (score, anchor) pairs gives every rank the same global top-k;
- each rank computes every selected span's (and the window's) softmax over the keys it holds as
  a normalised partial with its log-sum-exp; an all-gather and a log-sum-exp combine give the
  span outputs over all keys, which the gates then mix as on one process.

Both collectives are tensor collectives of shapes fixed by the query rows (no object
collectives, no data-dependent sizes). Launch one process per device the usual way
(``torchrun --nproc-per-node N``; ``init_from_env``), build the same model on each, and use
``new_cache`` instead of ``Model.new_cache``. See docs/distributed.md for the design and its numbers.
"""

from superlinear.distributed.cache import SlicedCache, gather_state, new_cache
from superlinear.distributed.launch import init_from_env
from superlinear.distributed.slices import ContextParallel, ContextSlices, merge_partials

__all__ = ["ContextParallel", "ContextSlices", "SlicedCache", "gather_state", "init_from_env", "merge_partials",
           "new_cache"]
