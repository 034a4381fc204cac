"""langchain_tests' standard suites (unit and integration) for each of a set of tool classes.

One factory for the test files that put every tool through them (the plain tools and their
per-conversation twins); each file says only how to build a tool, a valid call's arguments
and, when it has them, the ``init_from_env`` parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from langchain_core.tools import BaseTool
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests

from pf_metered.langchain import PurpleFleaTool

EnvParams = tuple[dict[str, str], dict[str, Any], dict[str, Any]]


def standard_suites(
    classes: Iterable[type[PurpleFleaTool]],
    *,
    params: Callable[[], dict[str, Any]],
    example: Callable[[str], dict[str, Any]],
    env: Callable[[str], EnvParams] | None = None,
) -> dict[str, type]:
    """``Test<Tool><Suite>`` classes by name, for the calling module's globals (pytest
    collects them there): both suites for each of ``classes``."""
    suites: dict[str, type] = {}
    for cls in classes:
        for base in (ToolsUnitTests, ToolsIntegrationTests):
            suite = _suite(base, cls, params, example, env)
            suites[suite.__name__] = suite
    return suites


def _suite(
    base: type,
    cls: type[PurpleFleaTool],
    params: Callable[[], dict[str, Any]],
    example: Callable[[str], dict[str, Any]],
    env: Callable[[str], EnvParams] | None,
) -> type:
    name = cls.definition.name

    class Suite(base):  # type: ignore[misc, valid-type]
        @property
        def tool_constructor(self) -> type[BaseTool]:
            return cls

        @property
        def tool_constructor_params(self) -> dict[str, Any]:
            return params()

        @property
        def tool_invoke_params_example(self) -> dict[str, Any]:
            return example(name)

    if env is not None:
        make_env = env  # a file without it keeps the suites' default
        Suite.init_from_env_params = property(lambda self: make_env(name))  # type: ignore[attr-defined]
    Suite.__name__ = Suite.__qualname__ = f"Test{cls.__name__}{base.__name__}"
    return Suite
