"""The errors users see, and the exit codes schedulers read: one code per kind of outcome.

0 done (or nothing to do); 1 a gate failed (or publish refused such a run); 2 a bad recipe or input (or a
request a remote service refused); 3 a remote service unreachable (retry later); 4 the run is locked by
another process; 70 the pipeline failed unexpectedly (a bug, or a library or a process it started failing
in a way no input explains: the full traceback is written to a crash log); 130 stopped by a signal.
"""

EXIT_GATES_FAILED = 1
EXIT_CRASHED = 70  # sysexits' EX_SOFTWARE: never 1, which means "a gate failed"

EXIT_CODES = {
    0: "done",
    EXIT_GATES_FAILED: "a gate failed",
    2: "a bad recipe or input",
    3: "a remote service unreachable",
    4: "the run is locked by another process",
    EXIT_CRASHED: "the pipeline failed unexpectedly",
    130: "stopped by a signal",
}


class PipelineError(Exception):
    """A problem the user can fix (bad recipe, missing file, stage run out of order).

    The message names the file, line or field, and says what to do. Real bugs are other exceptions:
    the CLI writes their traceback to a crash log and exits with EXIT_CRASHED.
    """

    exit_code = 2

    def __reduce__(self):
        # Crosses a process boundary (a worker pool, a spawned child) with its message, exit code and fields
        # intact, whatever its __init__ takes: Exception's own pickling calls cls(*args), which fails for an
        # error built from more than its message (RecipeError) and loses an exit code set on the instance.
        return (_rebuilt, (type(self), self.args, dict(self.__dict__)))


class GateFailed(PipelineError):
    """A bar the recipe sets was not reached before the work it guards (a teacher scored below
    synthesize.min_teacher_score): the gates' exit code, so a scheduled job reads it as one."""

    exit_code = EXIT_GATES_FAILED


class RemoteError(PipelineError):
    """A service the pipeline talks to (the Hub, an API) could not be reached or failed (5xx).

    Its own exit code, so a scheduled job can tell "retry later" from "fix the recipe".
    """

    exit_code = 3


class RunLocked(PipelineError):
    """Another process is working on this run folder."""

    exit_code = 4


class Interrupted(PipelineError):
    """Asked to stop (a scheduler's warning signal): finished stages and a fresh checkpoint are kept."""

    exit_code = 130


class RuntimeFailure(PipelineError):
    """A process the pipeline started died, or failed in a way that no input of the user explains
    (out of memory, a llama.cpp build for another CPU). Not the user's input: the crash code."""

    exit_code = EXIT_CRASHED


def _rebuilt(cls: type[PipelineError], args: tuple, state: dict) -> PipelineError:
    error = cls.__new__(cls, *args)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error
