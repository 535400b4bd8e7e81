"""The errors users see: the CLI prints them without a traceback and exits with their code."""


class PipelineError(Exception):
    """A problem the user can fix (bad recipe, missing file, stage run out of order).

    The message names the file, line or field, and says what to do. Real bugs are other exceptions
    and keep their traceback.
    """

    exit_code = 2


class RemoteError(PipelineError):
    """A service the pipeline talks to (the Hub) could not be reached or refused the request.

    Its own exit code, so a scheduled job can tell "retry later" from "fix the recipe".
    """

    exit_code = 3
