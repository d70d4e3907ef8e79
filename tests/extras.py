"""The heavy suites' system extras: run the suite if its extra is here, else skip it
with one line naming what is missing and the script that installs it.

`pip install -e '.[test]' && python3 -m pytest` must pass on a machine with only
Python, so the two-node NFS harness, the SLURM examples and the browser test skip
there. CI installs every extra and must run every suite: with ``CI=true`` (set by
CI services) or ``FILEFORWARD_TEST_ALL=1`` (set by .ci/run) a missing extra fails
the test with the same line instead of skipping it.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import pytest

RUN_ALL_ENV = "FILEFORWARD_TEST_ALL"
BROWSERS = ("chromium", "chromium-browser")
SKIP_LINE = re.compile(r"^(Skipped: )?[^:]+ unavailable: .+; run \S+$")  # what require() skips with


def must_run_everything() -> bool:
    """Whether a missing extra is a failure (CI) rather than a skip."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get(RUN_ALL_ENV) == "1"


def require(suite: str, why_not: Optional[str], script: str) -> None:
    """Skip the calling test (fail it under CI) if `why_not` says the extra is missing."""
    if why_not is None:
        return
    message = f"{suite} unavailable: {why_not}; run {script}"
    if must_run_everything():
        pytest.fail(f"{message} (CI=true or {RUN_ALL_ENV}=1: every suite must run)",
                    pytrace=False)
    pytest.skip(message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Report a missing extra's skips at one place, so that `-ra` folds each suite's
    skips into one summary line instead of one per test (imported by conftest.py)."""
    report = (yield).get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and SKIP_LINE.match(report.longrepr[2]):
        report.longrepr = (__file__, None, report.longrepr[2])


def require_nfs_harness(why_not: Optional[str] = None) -> None:
    """The two-node NFS emulation of tests/nfs_harness can run here (`why_not`, if
    given, is what failed when it tried)."""
    from tests.nfs_harness.cluster import missing_requirements
    require("two-node NFS harness", why_not or missing_requirements(), ".ci/install-nfs.sh")


def require_net_clients() -> None:
    """curl, git and openssl, which the proxy suite drives (tests/test_netforward.py)."""
    missing = [cmd for cmd in ("curl", "git", "openssl") if shutil.which(cmd) is None]
    require("proxy suite", f"{', '.join(missing)} not on PATH" if missing else None, ".ci/install-net.sh")


def require_slurm() -> None:
    """A private SLURM cluster (tests/slurm_cluster.py) can run here."""
    from tests.slurm_cluster import missing_requirements
    require("SLURM example suite", missing_requirements(), ".ci/install-slurm.sh")


def missing_browser() -> Optional[str]:
    """Why headless Chromium driven by playwright cannot run here, or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed"
    if chromium_executable() is None:
        return "no chromium on PATH (Debian package chromium)"
    return None


def chromium_executable() -> Optional[str]:
    """The system Chromium (playwright's executable_path), or None."""
    return next(filter(None, map(shutil.which, BROWSERS)), None)


def require_browser(script: str = ".ci/install-browser.sh") -> str:
    """Skip (fail under CI) unless playwright and Chromium are here; Chromium's path."""
    require("browser test", missing_browser(), script)
    return chromium_executable()
