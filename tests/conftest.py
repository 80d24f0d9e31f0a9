"""Shared fixtures: tiny real models (timm's ``test_efficientnet``) and the real data folder."""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bayesnet import BayesianEfficientNet, ModelSpec, build_model, save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _state_in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Services the tests start keep their default state (the SQLite audit trail) in a temporary directory, never
    in the home directory of whoever runs the suite; server subprocesses inherit the variable."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: a user's clone does not have it."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only present on the project's machines)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_site_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site's model (``bench.guarantee_site.build_site_model``): the small test network trained on synthetic films
    (128 px, 13 findings at 10% each) and its rule calibrated on 600 others (alpha = study_alpha = delta = 0.1).
    Built once a session (about 30 s) for the tests that operate or audit a site."""
    from bench.guarantee_site import build_site_model

    return build_site_model(tmp_path_factory.mktemp("site-model"), image_size=128, prevalence=0.1)


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec(arch="test_efficientnet", image_size=64, name="tiny-test")


@pytest.fixture
def tiny_model(tiny_spec: ModelSpec) -> BayesianEfficientNet:
    torch.manual_seed(0)
    return build_model(tiny_spec)


@pytest.fixture
def tiny_checkpoint(tiny_model: BayesianEfficientNet, tmp_path: Path) -> Path:
    return save_checkpoint(tiny_model, None, tmp_path / "ckpt")


# --- Test tiers ----------------------------------------------------------------------------------------------------
# `make test` runs everything; `make test-fast` deselects the two markers below, which are added here from what a
# test does, read from its code and its fixtures' code, so that a new test is classified without anyone listing it.

#: Names whose use makes a test `integration`: a service on a loopback port, in this process (``live_server``) or
#: its own (``ServerProcess``: ``python -m service``), or an external program started for it (Orthanc, nginx and
#: Gunicorn through ``Popen``, Chromium through Playwright, PostgreSQL).
_INTEGRATION_NAMES = frozenset(
    {"live_server", "ServerProcess", "orthanc", "Popen", "sync_playwright", "PostgresServer"}
)
_TESTS_DIR = Path(__file__).resolve().parent


def _names_used(func: object, seen: set[types.CodeType]) -> set[str]:
    """The global and attribute names ``func`` uses (nested functions and lambdas included) and, recursively, those
    of the functions it calls by name, such as a module's ``_run`` helper; only code under tests/ is read."""
    func = inspect.unwrap(func)  # type: ignore[arg-type]
    code = getattr(func, "__code__", None)
    if not isinstance(code, types.CodeType) or code in seen or not Path(code.co_filename).is_relative_to(_TESTS_DIR):
        return set()
    seen.add(code)
    pending: list[types.CodeType] = [code]
    names: set[str] = set()
    while pending:
        current = pending.pop()
        names.update(current.co_names)
        pending.extend(const for const in current.co_consts if isinstance(const, types.CodeType))
    namespace: dict[str, object] = getattr(func, "__globals__", {})
    for name in list(names):
        helper = namespace.get(name)
        if isinstance(helper, types.FunctionType):
            names |= _names_used(helper, seen)
    return names


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``integration`` what starts the service or an external program (see ``_INTEGRATION_NAMES``) or runs against
    PostgreSQL (the ``audit_url`` parameter), and ``slow`` what starts a fresh Python interpreter
    (``subprocess`` with ``sys.executable``: importing torch there takes seconds)."""
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        seen: set[types.CodeType] = set()
        names = _names_used(item.function, seen)
        for fixturedefs in item._fixtureinfo.name2fixturedefs.values():
            for fixturedef in fixturedefs:
                names |= _names_used(fixturedef.func, seen)
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if names & _INTEGRATION_NAMES or params.get("audit_url") == "postgresql":
            item.add_marker(pytest.mark.integration)
        if {"subprocess", "executable"} <= names:
            item.add_marker(pytest.mark.slow)
