"""Running the calls of a turn: every episode's at once, each bounded by a timeout.

`CallRunner.run` takes one list of calls per episode. The lists run concurrently; the calls of
one list run in the order the model wrote them, since they may act on one environment's state
(a game's two moves, a file written then read), unless `ordered=False` lets them overlap too
(independent lookups: several searches in one turn). `async def` functions are awaited together on
one event loop, which lives on its own thread for the runner's whole life (so async clients a
tool keeps between calls stay on one loop, and a caller inside a running loop, a notebook, is no
obstacle); plain functions run in a thread pool.

Each call is bounded by `timeout` seconds. An async call that overruns is cancelled; a plain
function cannot be stopped, so its thread runs on until it returns, but the episode does not wait
for it. A call that raises, or calls `sys.exit`, gives its exception as its outcome: nothing a
tool does ends the run or the loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Call:
    """One function to call, with its arguments."""
    fn: Callable
    kwargs: dict = field(default_factory=dict)
    args: tuple = ()


@dataclass
class Outcome:
    """What a call gave: its value, or the exception it raised, or that it timed out."""
    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


class CallRunner:
    """An event loop on a daemon thread and a thread pool; `close()` (or `with`) ends both.

    `max_workers` bounds the plain functions running at once (default 64: tools mostly wait
    on a network or a subprocess, and a turn's calls should not queue behind each other).
    """

    def __init__(self, max_workers: int = 64):
        self.loop = asyncio.new_event_loop()
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpo-agent-call")
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpo-agent-loop", daemon=True)
        self.thread.start()

    def run(self, batches: list[list[Call]], timeout: float | None, ordered: bool = True) -> list[list[Outcome]]:
        """The outcome of every call: batches concurrently, the calls of a batch in order (or, with
        `ordered=False`, concurrently as well)."""
        if not any(batches):
            return [[] for _ in batches]
        return asyncio.run_coroutine_threadsafe(self._all(batches, timeout, ordered), self.loop).result()

    def close(self) -> None:
        """Stop the loop and let the pool's threads end when their calls return."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
        self.loop.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "CallRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def _all(self, batches: list[list[Call]], timeout: float | None, ordered: bool) -> list[list[Outcome]]:
        async def batch(calls: list[Call]) -> list[Outcome]:
            if not ordered:
                return list(await asyncio.gather(*(self._one(call, timeout) for call in calls)))
            return [await self._one(call, timeout) for call in calls]

        return list(await asyncio.gather(*(batch(calls) for calls in batches)))

    async def _one(self, call: Call, timeout: float | None) -> Outcome:
        start = time.perf_counter()
        try:
            value = await asyncio.wait_for(self._invoke(call), timeout if timeout and timeout > 0 else None)
        except asyncio.TimeoutError:
            return Outcome(timed_out=True, seconds=time.perf_counter() - start)
        except SystemExit as e:  # a tool's sys.exit() would otherwise stop the loop itself
            return Outcome(error=RuntimeError(f"called sys.exit({e.code!r})"), seconds=time.perf_counter() - start)
        except Exception as e:
            return Outcome(error=e, seconds=time.perf_counter() - start)
        return Outcome(value=value, seconds=time.perf_counter() - start)

    async def _invoke(self, call: Call) -> Any:
        if inspect.iscoroutinefunction(call.fn):
            return await call.fn(*call.args, **call.kwargs)
        value = await self.loop.run_in_executor(self.pool, functools.partial(_guarded, call))
        if inspect.isawaitable(value):  # a plain function that hands back a coroutine (a partial of an async one)
            value = await value
        return value


def _guarded(call: Call) -> Any:
    try:
        return call.fn(*call.args, **call.kwargs)
    except SystemExit as e:  # raised in the pool, it would surface on the loop as a SystemExit
        raise RuntimeError(f"called sys.exit({e.code!r})") from None
