"""`--param KEY=VALUE`: any parameter of a workload, typed from its params class, checked."""

from __future__ import annotations

import pytest

from kvrt.runtime.bench.main import workload_from
from kvrt.runtime.bench.workloads import make_workload
from kvrt.runtime.cli import build_parser


def parse(*argv: str):
    return build_parser().parse_args(["bench", *argv])


def test_params_reach_the_workload_typed_and_win_over_quick() -> None:
    args = parse("tool-agents", "--quick", "--param", "tool_output_words=400",
                 "--param", "tool_median_s = 3.5", "--rounds", "3")
    params = workload_from(args).params
    assert (params.tool_output_words, params.tool_median_s) == (400, 3.5)
    assert params.turns == 3 and params.runs == 2  # --rounds, and the rest of --quick
    texts = {len(output.split()) for plan in workload_from(args).plans
             for outputs in plan.tool_outputs for output in outputs}
    assert texts == {400}


@pytest.mark.parametrize(("settings", "words"), [
    ({"tool_output_chars": "5"}, "has no parameter 'tool_output_chars'"),
    ({"turns": "many"}, "turns='many': expected int"),
    ({"tool_median_s": ""}, "expected float"),
])
def test_a_bad_param_is_refused_with_what_is_wrong(settings, words) -> None:
    with pytest.raises(ValueError, match=words):
        make_workload("tool-agents", settings=settings)


def test_the_cli_refuses_a_param_without_a_value(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("tool-agents", "--param", "turns")
    assert exited.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="has no parameter 'agents'"):
        workload_from(parse("tool-agents", "--param", "agents=3"))


def test_langgraph_params_take_the_common_flags_and_quick() -> None:
    params = workload_from(parse("langgraph", "--quick", "--threads", "3", "--rounds", "4",
                                 "--param", "routes=5")).params
    assert (params.threads, params.turns, params.routes) == (3, 4, 5)
    assert (params.tool_median_s, params.human_median_s) == (0.5, 1.0)  # the rest of --quick
    workload = make_workload("langgraph", threads=3, turns=4, routes=5)
    assert [len(plan.tools) for plan in workload.plans if plan.app == "react"] == [4, 4, 4]
    assert [len(plan.lengths) for plan in workload.plans] == [5] * 3 + [11] * 3 + [2] * 3


@pytest.mark.parametrize(("settings", "words"), [
    ({"threads": "0"}, "threads must be at least 1, not 0"),
    ({"routes": "-1"}, "routes must not be negative"),
    ({"tool_p95_s": "0.5"}, r"need 0 < tool_median_s <= tool_p95_s, not 2.0 and 0.5"),
    ({"human_median_s": "0"}, "need 0 < human_median_s"),
    ({"specialist_tool_share": "1.5"}, r"specialist_tool_share must be within \[0, 1\]"),
    ({"min_output_tokens": "100"}, "max_output_tokens must be at least min_output_tokens"),
    ({"turn": "3"}, "has no parameter 'turn'"),
])
def test_a_bad_langgraph_param_is_refused_with_what_is_wrong(settings, words) -> None:
    with pytest.raises(ValueError, match=words):
        make_workload("langgraph", settings=settings)
    argv = [item for key, value in settings.items() for item in ("--param", f"{key}={value}")]
    with pytest.raises(SystemExit, match="kvrt: --param: "):
        workload_from(parse("langgraph", *argv))
