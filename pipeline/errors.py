"""The one error type users see: the CLI prints it without a traceback and exits non-zero."""


class PipelineError(Exception):
    """A problem the user can fix (bad recipe, missing file, stage run out of order).

    The message names the file, line or field, and says what to do. Real bugs are other exceptions
    and keep their traceback.
    """
