"""Failures of remote services as errors a user acts on: the Hub unreachable or failing (retry later, exit 3)
apart from a repository, revision or file that does not exist or is gated (fix the recipe or the token, exit 2).

Light on purpose: the data stage and the model loader both read it, and neither should load the other.
"""

from __future__ import annotations

from pipeline.errors import PipelineError, RemoteError


def hub_failure(error: Exception, what: str) -> PipelineError:
    """A Hub failure as the error a user acts on: the Hub unreachable or failing (retry later, exit 3) apart
    from a repo, revision or file that does not exist or is gated (fix the recipe or the token, exit 2)."""
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return PipelineError(
            f"{what} is gated: accept its terms on the Hub and log in (`hf auth login`) or set HF_TOKEN"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return PipelineError(f"{what}: no such model repository on the Hub (or it is private and no token can read it)")
    if isinstance(error, errors.RevisionNotFoundError):
        return PipelineError(f"{what}: the repository has no such branch, tag or commit")
    if isinstance(error, errors.HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status is not None and (status >= 500 or status == 429):
            return RemoteError(f"{what}: the Hub answered {status}; retry later")
        return PipelineError(f"{what}: the Hub refused the request ({status}: {first_line(error)})")
    if is_unreachable(error):
        return RemoteError(f"{what}: the Hub could not be reached ({first_line(error)}); retry when it can")
    return PipelineError(f"{what}: {type(error).__name__}: {first_line(error)}")


def hub_failure_in_chain(error: BaseException, what: str) -> PipelineError | None:
    """The Hub failure behind a library's error (transformers and datasets wrap the Hub client's), if any."""
    from huggingface_hub import errors

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, errors.HfHubHTTPError) or is_unreachable(error):
            return hub_failure(error, what)
        error = error.__cause__ or error.__context__
    return None


def is_unreachable(error: BaseException) -> bool:
    """A connection that failed or timed out (the Hub client's httpx errors, or the OS's)."""
    return isinstance(error, ConnectionError | TimeoutError) or type(error).__module__.split(".")[0].startswith("httpx")


def first_line(error: BaseException) -> str:
    """An exception's first line, capped: enough to act on, never a library's whole dump."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
