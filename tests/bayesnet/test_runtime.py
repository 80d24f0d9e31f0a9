"""tune_allocator: glibc stops handing activation-sized blocks back to the kernel after every free."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from bayesnet import tune_allocator

PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from bayesnet import tune_allocator
    applied = tune_allocator() if sys.argv[1] == "tuned" else False
    net = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)]).eval()
    x = torch.randn(1, 32, 112, 112)  # the size of an EfficientNet stem activation at 224 px
    with torch.inference_mode():
        net(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            net(x)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def probe(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    applied, faults = done.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    _, default_faults = probe("default")
    applied, tuned_faults = probe("tuned")
    assert applied
    # Default glibc gives 1.6 MB activations back on free and faults them in again on a later call (1,500 to
    # 61,000 minor faults over 20 such calls in our runs, depending on how its dynamic threshold settles);
    # tuned, the heap reuses the same blocks and only first touches fault (0 to about 400).
    assert default_faults > 3 * max(tuned_faults, 500), (default_faults, tuned_faults)


def test_an_allocator_the_environment_chose_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert tune_allocator() is False
    applied, _ = probe("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")
    assert applied is False
