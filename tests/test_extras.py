"""tests/extras.py: a missing extra skips with one line, except under CI where it fails."""
import pytest

from tests.extras import RUN_ALL_ENV, require

pytest_plugins = ["pytester"]

LINE = "widget suite unavailable: no widget here; run .ci/install-widget.sh"


@pytest.fixture
def not_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(RUN_ALL_ENV, raising=False)


def test_a_present_extra_lets_the_test_run(not_ci: None) -> None:
    require("widget suite", None, ".ci/install-widget.sh")


def test_a_missing_extra_skips_naming_what_and_the_script(not_ci: None) -> None:
    with pytest.raises(pytest.skip.Exception) as skipped:
        require("widget suite", "no widget here", ".ci/install-widget.sh")
    assert skipped.value.msg == LINE


@pytest.mark.parametrize("variable, value", [("CI", "true"), (RUN_ALL_ENV, "1")])
def test_under_ci_a_missing_extra_fails_with_the_same_line(
        monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(RUN_ALL_ENV, raising=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(pytest.fail.Exception) as failed:
        require("widget suite", "no widget here", ".ci/install-widget.sh")
    assert failed.value.msg.startswith(LINE)


def test_a_suites_skips_fold_into_one_summary_line(pytester: pytest.Pytester, not_ci: None) -> None:
    """Four tests in two files skipped for one missing extra: one `-ra` line."""
    pytester.makeconftest("from tests.extras import pytest_runtest_makereport  # noqa: F401\n")
    body = ("import pytest\nfrom tests.extras import require\n\n"
            "@pytest.fixture\ndef widget():\n"
            "    require('widget suite', 'no widget here', '.ci/install-widget.sh')\n\n"
            "def test_one(widget):\n    pass\n\ndef test_two(widget):\n    pass\n")
    pytester.makepyfile(test_a=body, test_b=body.replace("test_two", "test_three"))
    result = pytester.runpytest("-ra", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=4)
    summary = [line for line in result.outlines if line.startswith("SKIPPED")]
    assert len(summary) == 1 and summary[0].endswith(LINE) and "[4]" in summary[0], summary
