"""The ``local`` executor: every job in this process, one after another.

One progress bar counts jobs (with rate and ETA); a job draws its own bar below it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import attrs
from tqdm.auto import tqdm

from puzzle_core.api import Executor, ExecutorPlugin, Job, StageContext, hookimpl, torch_threads


@attrs.frozen
class LocalOptions:
    threads: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # torch threads; 0: the run's `threads`


class LocalExecutor(Executor):
    def __init__(self, options: LocalOptions):
        self.options = options

    def run(
        self,
        jobs: Sequence[Job],
        work: Callable[[Job], None],
        description: str = "jobs",
        context: StageContext | None = None,
    ) -> None:
        with torch_threads(self.options.threads), tqdm(jobs, desc=description, unit="job", dynamic_ncols=True) as bar:
            for job in bar:
                bar.set_postfix_str(job.id, refresh=False)
                work(job)


@hookimpl
def puzzle_executors() -> list[ExecutorPlugin]:
    return [
        ExecutorPlugin(
            name="local",
            implementation=LocalExecutor,
            options=LocalOptions,
            description="runs jobs one after another in this process",
        )
    ]
