"""pytest plugin (``-p vllm_rapid.testing.vllm_suite.plugin``): vLLM's own tests, run against RAPID.

* Scheduler tests: where vLLM's test helpers build ``Scheduler`` (``tests/v1/core/utils.py`` and the test's own
  module), they build ``CombinedRapidScheduler``; a selected scheduler test that builds none fails.
* Engine tests: every ``EngineArgs`` (``LLM``, ``AsyncLLM``, vLLM's ``vllm_runner``) gets ``scheduler="rapid"``;
  a selected file whose tests configure no RAPID engine fails.
* Only the selection runs. By-design differences and known RAPID bugs run as strict xfails with their reason, so
  an unexpected failure and an unexpected pass both fail the run; so does a selected test that skips.

With ``--rapid-baseline`` the selection runs on vLLM's own scheduler, unmarked: every selected test must pass
there (offline, on the tiny model), so that a failure under RAPID is RAPID's.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from vllm_rapid.testing.vllm_suite import selection
from vllm_rapid.testing.vllm_suite.adapter import CombinedRapidScheduler

BY_DESIGN_PREFIX = "by design: "
RAPID_BUG_PREFIX = "RAPID bug: "


class RapidSuite:
    """The plugin's state: which tests are selected, and what each file's tests built."""

    def __init__(self, baseline: bool, chosen: selection.Selection) -> None:
        self.baseline = baseline
        self.selection = chosen
        self.current_file: str | None = None
        self.rapid_engines: Counter[str] = Counter()  # selected engine-test file -> RAPID engine configs built
        self.problems: list[str] = []

    # ---- selection ----------------------------------------------------------------------------------------------

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        selected: list[pytest.Item] = []
        deselected: list[pytest.Item] = []
        for item in items:
            (selected if self.selection.group_of(item.nodeid) else deselected).append(item)
            if self.baseline:
                continue
            for prefix, reasons in ((BY_DESIGN_PREFIX, self.selection.by_design),
                                    (RAPID_BUG_PREFIX, self.selection.rapid_bugs)):
                if (reason := selection.reason_for(reasons, item.nodeid)) is not None:
                    item.add_marker(pytest.mark.xfail(reason=prefix + reason, strict=True))
        collected = {item.nodeid for item in items}
        files = {nodeid.split("::")[0] for nodeid in collected}
        stale = [
            e for e in self.selection.all_entries()
            if e.split("::")[0] in files and not any(selection.matches(e, n) for n in collected)
        ]
        if stale and not config.option.keyword and not config.option.markexpr:
            raise pytest.UsageError(f"selection entries that match no collected test: {stale}")
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected

    # ---- engine tests: RAPID in every EngineArgs -----------------------------------------------------------------

    @pytest.fixture(scope="session", autouse=True)
    def _rapid_engine_args(self) -> Iterator[None]:
        from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

        if self.baseline:
            yield
            return
        with pytest.MonkeyPatch.context() as patch:
            for cls in (EngineArgs, AsyncEngineArgs):
                patch.setattr(cls, "__init__", _rapid_by_default(cls.__init__))
            patch.setattr(EngineArgs, "create_engine_config", self._counted(EngineArgs.create_engine_config))
            yield

    def _counted(self, create_engine_config):
        from vllm_rapid.policy import is_rapid

        @functools.wraps(create_engine_config)
        def create_and_count(engine_args: Any, *args: Any, **kwargs: Any):
            config = create_engine_config(engine_args, *args, **kwargs)
            if is_rapid(config.scheduler_config.scheduler_cls) and self.current_file is not None:
                self.rapid_engines[self.current_file] += 1
            return config

        return create_and_count

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        self.current_file = item.nodeid.split("::")[0]  # module-scoped engines start in the first test's setup
        return (yield)

    # ---- scheduler tests: RAPID where the helpers build Scheduler ----------------------------------------------

    @pytest.fixture(autouse=True)
    def _rapid_scheduler(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        if self.baseline or self.selection.group_of(request.node.nodeid) != "scheduler":
            yield
            return
        built: list[CombinedRapidScheduler] = []

        class TrackedScheduler(CombinedRapidScheduler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                built.append(self)

        for module in (sys.modules.get("tests.v1.core.utils"), request.module):
            if module is not None and hasattr(module, "Scheduler"):
                monkeypatch.setattr(module, "Scheduler", TrackedScheduler)
        yield
        if not built:
            pytest.fail("this selected scheduler test built no RapidScheduler")

    # ---- report ---------------------------------------------------------------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.problems.append(f"{report.nodeid}: selected but skipped ({report.longrepr})")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        option = session.config.option
        if self.baseline or option.collectonly or option.keyword or option.markexpr:
            return
        ran = {
            item.nodeid.split("::")[0] for item in session.items if self.selection.group_of(item.nodeid) == "engine"
        }
        self.problems += [f"{f}: configured no RAPID engine" for f in sorted(ran) if not self.rapid_engines[f]]
        if self.problems and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        stats = terminalreporter.stats
        xfailed = [r.wasxfail for r in stats.get("xfailed", [])]
        counts = {
            "passed": len(stats.get("passed", [])),
            "failed": len(stats.get("failed", [])) + len(stats.get("error", [])),
            "by design": sum(r.startswith(BY_DESIGN_PREFIX) for r in xfailed),
            "known RAPID bugs": sum(r.startswith(RAPID_BUG_PREFIX) for r in xfailed),
            "xfailed or xpassed by vLLM's own marks": len(stats.get("xpassed", []))
            + sum(not r.startswith((BY_DESIGN_PREFIX, RAPID_BUG_PREFIX)) for r in xfailed),
        }
        scheduler = "vLLM's own scheduler (baseline)" if self.baseline else "RAPID"
        terminalreporter.section(f"vLLM's tests under {scheduler}")
        for problem in self.problems:
            terminalreporter.write_line(f"PROBLEM {problem}")
        terminalreporter.write_line(", ".join(f"{n} {what}" for what, n in counts.items()))


def _rapid_by_default(init):
    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("scheduler_cls") is not None:
            raise ValueError(f"a selected test picks its own scheduler_cls ({kwargs['scheduler_cls']})")
        kwargs.setdefault("scheduler", "rapid")
        init(self, *args, **kwargs)

    return __init__


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--rapid-baseline", action="store_true", help="run the selection on vLLM's own scheduler")


def pytest_configure(config: pytest.Config) -> None:
    from vllm_rapid.patch.versions import vllm_version

    try:
        chosen = selection.for_version(vllm_version())
    except KeyError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.pluginmanager.register(RapidSuite(config.getoption("--rapid-baseline"), chosen), "rapid_suite")
