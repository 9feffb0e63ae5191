"""pytest-benchmark suites: `pytest benchmarks` (timed) or `pytest benchmarks -q --benchmark-disable` (smoke).

Triton is never run in interpreter mode here (TRITON_INTERPRET stays as the caller set it): on a machine with
no GPU the triton provider skips, since the interpreter is not a speed path.
"""

import pytest
import torch

from bench_harness import NO_GPU, ON_GPU  # noqa: E402  (benchmarks/ is on sys.path: rootdir-relative import)


def pytest_report_header(config):
    from resnet_fused.benchmarking.environment import environment

    env = environment("cuda" if ON_GPU else "cpu")
    return (f"resnet_fused benchmarks on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
            f"CUDA {env['cuda']}, {torch.get_num_threads()} CPU threads" + ("" if ON_GPU else f" ({NO_GPU})"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
