"""The checks of tests/test_distributed.py on two GPUs over NCCL (the device machine's
``nvidia-h200-x2`` or larger): two ranks give what one GPU gives."""

from __future__ import annotations

import pytest
import torch
from test_distributed import (  # noqa: F401 - collected here again, with the NCCL fixture below
    run_both,
    test_each_rank_holds_only_its_slice,
    test_sliced_kernel_equals_the_whole_one,
    test_state_saved_on_one_process_continues_on_two_ranks,
    test_state_saved_on_two_ranks_continues_on_one,
    test_two_ranks_prefill_and_decode_like_one_process,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA GPUs")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_both(tmp_path_factory.mktemp("dist_gpu"), "cuda")
