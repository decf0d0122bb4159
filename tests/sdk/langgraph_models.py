"""A chat model for the LangGraph tests that asks for tools as a real one would: tiny models
cannot emit tool calls, so `ToolCaller` makes its KV-holding call on the daemon through
`KvrtChatModel` (attributed like any call in the graph) and then attaches a tool call to the
reply, on every turn that does not follow a tool's answer."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig

from kvrt.sdk.langgraph import KvrtChatModel


class ToolCaller(BaseChatModel):
    kvrt: KvrtChatModel
    tool: str
    args: dict[str, Any]
    system: str = ""  # a long one makes the agent's KV several blocks
    # Called after the daemon's reply, before the tool call is handed on (see its use).
    settle: Callable[[], None] | None = None

    @property
    def _llm_type(self) -> str:
        return "tool-caller"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ToolCaller:
        return self

    def _prompt(self, messages: list[BaseMessage]) -> list[BaseMessage]:
        # Plain text: the tiny daemon need not understand tool messages to hold their KV.
        text = " ".join(str(m.content) for m in messages if m.content)
        return [HumanMessage(f"{self.system}{text or 'Go.'}")]

    def _reply(self, messages: list[BaseMessage], reply: BaseMessage) -> ChatResult:
        if self.settle is not None:
            self.settle()
        if messages and isinstance(messages[-1], ToolMessage):
            message = AIMessage(content=str(reply.content))
        else:
            message = AIMessage(content="", tool_calls=[{
                "name": self.tool, "args": self.args, "id": f"call-{uuid.uuid4().hex[:8]}"}])
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        reply = self.kvrt.invoke(self._prompt(messages), _inner(run_manager))
        return self._reply(messages, reply)

    async def _agenerate(self, messages: list[BaseMessage], stop: Any = None,
                         run_manager: Any = None, **kwargs: Any) -> ChatResult:
        reply = await self.kvrt.ainvoke(self._prompt(messages), _inner(run_manager))
        return self._reply(messages, reply)


def _inner(run_manager: Any) -> RunnableConfig:
    """The config of a call made inside this model's run: its handlers and metadata (the
    graph, thread and node the call belongs to)."""
    return {"callbacks": run_manager.inheritable_handlers,
            "metadata": run_manager.inheritable_metadata}
