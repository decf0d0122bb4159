"""Structured output and tool calling as LangChain and LangGraph use them, against the daemon
serving the real default model (SmolLM2-135M-Instruct): a model this small rarely writes a
well-formed call on its own, so these pass only because the daemon's grammars make every
structured reply valid. Real ChatOpenAI, real create_react_agent, a real tool."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent
from pydantic import BaseModel, Field

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import LiveServer, live_server, wait_released

pytestmark = pytest.mark.slow


class Weather(BaseModel):
    """The weather report for a city."""

    city: str = Field(description="The city's name")
    temperature_c: int = Field(ge=-60, le=60)
    sky: Literal["sunny", "cloudy", "rainy"]


class Itinerary(BaseModel):
    """A short trip."""

    days: list[str] = Field(min_length=1, max_length=3, description="One activity a day")
    budget: Literal["low", "mid", "high"]


CALLED: list[str] = []


@tool
def get_weather(city: str) -> str:
    """Returns the current weather in a city."""
    CALLED.append(city)
    return f"It is 21C and sunny in {city}."


@tool
def convert(amount: float, currency: Literal["EUR", "USD", "GBP"]) -> str:
    """Converts an amount of money into another currency."""
    return f"{amount} {currency}"


@pytest.fixture(scope="module")
def smollm() -> Iterator[LiveServer]:
    config = EngineConfig(model=None, kv_cache_memory=64 * 1024**2, max_model_len=2048)
    yield from live_server(None, config, served_model_name=None)


@pytest.fixture
def llm(smollm: LiveServer) -> Iterator[ChatOpenAI]:
    yield ChatOpenAI(base_url=smollm.url + "/v1", api_key="unused", model="SmolLM2-135M-Instruct",
                     temperature=0, max_tokens=200, max_retries=0)
    wait_released(smollm)


@pytest.mark.parametrize("schema", [Weather, Itinerary])
def test_with_structured_output_json_schema(llm: ChatOpenAI, schema) -> None:
    structured = llm.with_structured_output(schema, method="json_schema")
    answer = structured.invoke("What is the weather in Paris? Plan a trip there.")
    assert isinstance(answer, schema)  # LangChain parsed and validated it


def test_with_structured_output_function_calling(llm: ChatOpenAI) -> None:
    structured = llm.with_structured_output(Weather, method="function_calling")
    answer = structured.invoke("Report the weather in Rome.")
    assert isinstance(answer, Weather)


@pytest.mark.parametrize("choice", ["required", "convert"])
def test_bind_tools_with_a_forced_choice_calls_validly(llm: ChatOpenAI, choice: str) -> None:
    bound = llm.bind_tools([get_weather, convert], tool_choice=choice)
    reply = bound.invoke("How warm is it in Oslo, and what is 10 dollars in euros?")
    assert isinstance(reply, AIMessage) and reply.tool_calls, reply
    assert not reply.invalid_tool_calls
    for call in reply.tool_calls:
        assert choice == "required" or call["name"] == choice
        tool_of = {"get_weather": get_weather, "convert": convert}[call["name"]]
        tool_of.args_schema.model_validate(call["args"])  # the tool's own schema


def test_a_react_agent_calls_a_real_tool_then_answers(llm: ChatOpenAI) -> None:
    """The first turn must make one call (tool_choice "required", parallel_tool_calls false);
    after the tool's result the model answers in text (tool_choice "none")."""
    tools = [get_weather]

    def model(state, runtime):
        answered = any(isinstance(m, ToolMessage) for m in state["messages"])
        if answered:
            return llm.bind_tools(tools, tool_choice="none")
        return llm.bind_tools(tools, tool_choice="required", parallel_tool_calls=False)

    with warnings.catch_warnings():  # create_react_agent moved to langchain.agents
        warnings.simplefilter("ignore")
        agent = create_react_agent(model, tools)
    CALLED.clear()
    result = agent.invoke({"messages": [HumanMessage("What's the weather in Lisbon?")]})
    kinds = [type(m) for m in result["messages"]]
    assert kinds == [HumanMessage, AIMessage, ToolMessage, AIMessage], result["messages"]
    assert len(CALLED) == 1  # the tool really ran, with the model's argument
    assert result["messages"][2].content == f"It is 21C and sunny in {CALLED[0]}."
    assert result["messages"][-1].content and not result["messages"][-1].tool_calls
