"""The offline engine (``vllm.LLM``) in a process of its own, for tests that check what it computes.

Building ``vllm.LLM`` changes process-wide state that outlives the engine:
vLLM's CPU worker replaces ``torch.set_num_threads`` with a function that
only logs, and it sets environment variables (``LD_PRELOAD`` among them, which
every later child process inherits), the multiprocessing start method,
``sys.excepthook``, warning filters and the random generators' seeds. In the
test process that would change every later test (tests/conftest.py fails a
test that leaves such a change), so the engine is built in a ``spawn`` child
that does nothing else: a test sends it functions to run against the engine
and gets their results back, pickled.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Seconds a child may take to build its engine or to answer one call.
CALL_TIMEOUT_S = 900


def config_engine(config: str | Path):
    """The offline engine of a config file, with the config's parts."""
    from serve.engine.offline import OfflineEngine
    from serve.grading.config import load_config

    return OfflineEngine(load_config(config))


def _serve(conn, build: Callable, build_args: tuple) -> None:
    """The child: build the engine, run each call sent to it, close the engine when told to stop."""
    try:
        engine = build(*build_args)
    except Exception:  # noqa: BLE001 - sent to the test, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    try:
        while True:
            message = conn.recv()
            if message is None:
                break
            fn, args = message
            try:
                conn.send(("ok", fn(engine, *args)))
            except Exception:  # noqa: BLE001 - sent to the test, which raises it
                conn.send(("error", traceback.format_exc()))
    finally:
        engine.shutdown()
        conn.send(("closed", None))


class EngineProcess:
    """Calls into an engine that lives in a child process (see :func:`engine_process`)."""

    def __init__(self, proc, conn):
        self.proc, self.conn = proc, conn

    def _answer(self, what: str) -> Any:
        if not self.conn.poll(CALL_TIMEOUT_S):
            raise TimeoutError(f"the engine process gave no answer to {what} in {CALL_TIMEOUT_S} s")
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.proc.join(10)
            raise RuntimeError(f"the engine process ended (exit {self.proc.exitcode}) during {what}") from None
        if status == "error":
            raise RuntimeError(f"{what} failed in the engine process:\n{value}")
        return value

    def call(self, fn: Callable, *args: Any) -> Any:
        """``fn(engine, *args)`` run in the engine's process; ``fn`` is a module-level function (pickled by name)."""
        self.conn.send((fn, args))
        return self._answer(getattr(fn, "__name__", repr(fn)))


@contextmanager
def engine_process(build: Callable = config_engine, *build_args: Any) -> Iterator[EngineProcess]:
    """``build(*build_args)`` (the engine) in a ``spawn`` child, closed and ended when the block ends."""
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child_conn, build, build_args), name="offline-engine")
    proc.start()
    child_conn.close()
    engine = EngineProcess(proc, conn)
    try:
        engine._answer("building the engine")
        yield engine
    finally:
        try:
            if proc.is_alive():
                conn.send(None)
                engine._answer("closing the engine")
        finally:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
