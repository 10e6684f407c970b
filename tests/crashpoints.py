"""Failpoints for the crash harness: the ``puzzle`` CLI, SIGKILLed by itself at a chosen moment.

``python -m crashpoints run CONFIG ...`` (with ``tests/`` on ``PYTHONPATH``) runs exactly
what the ``puzzle`` console script runs, after wrapping two things: every stage's ``run``
(so we know which stage is working) and the calls that make a write durable and visible,
``os.fsync`` and ``os.replace`` (every atomic write makes both). ``PUZZLE_CRASH`` (JSON)
says what to do with them:

- ``{"trace": FILE}``: append one JSON line per write event, ``{"stage", "event", "at"}``.
- ``{"stage": S, "event": K, "delay": D}``: at the ``K``-th write event of stage ``S`` in
  this process, SIGKILL the process after ``D`` seconds (``D == 0``: just before the
  fsync or rename happens); if the stage's work returns first, SIGKILL it then, before
  the stage is recorded as done.

Nothing here changes what the pipeline does; it only picks the moment of a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from puzzle_core.pipeline import Stage


class Failpoints:
    def __init__(self, plan: dict):
        self.plan = plan
        self.stage: str | None = None
        self.events = 0  # write events of the current stage

    def kill(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def event(self) -> None:
        if self.stage is not None:
            self.events += 1
        if "trace" in self.plan:
            with open(self.plan["trace"], "a") as handle:
                handle.write(json.dumps({"stage": self.stage, "event": self.events, "at": time.monotonic()}) + "\n")
        elif self.stage is not None and self.stage == self.plan.get("stage") and self.events == self.plan["event"]:
            if self.plan["delay"] <= 0:
                self.kill()
            else:
                threading.Timer(self.plan["delay"], self.kill).start()

    def stage_ended(self, name: str) -> None:
        self.stage = None
        if "stage" in self.plan and name == self.plan["stage"]:
            self.kill()

    def install(self) -> None:
        failpoints = self

        def counted(call):
            def wrapper(*args, **kwargs):
                failpoints.event()
                return call(*args, **kwargs)

            return wrapper

        os.fsync, os.replace = counted(os.fsync), counted(os.replace)
        runner = Stage.runner

        def watched_runner(stage: Stage):
            run = runner(stage)

            def watched(ctx):
                failpoints.stage, failpoints.events = stage.name, 0
                outputs = run(ctx)
                failpoints.stage_ended(stage.name)
                return outputs

            return watched

        Stage.runner = watched_runner


if __name__ == "__main__":
    Failpoints(json.loads(os.environ.get("PUZZLE_CRASH", "{}"))).install()
    from puzzle_core.cli import main

    sys.exit(main(sys.argv[1:]))
