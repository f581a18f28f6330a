"""Exceptions the stages raise; the CLI turns them into messages and exit codes, once."""


class PipelineError(Exception):
    """A failure the user can act on; the message says what and where."""

    exit_code = 1


class InputError(PipelineError):
    """Bad or missing input: the message names the file (or tensor) and what is wrong."""

    exit_code = 2


class OutputExistsError(PipelineError):
    """The output path exists and --force was not given."""

    exit_code = 2


class CheckFailed(PipelineError):
    """A verification check failed; the artifact must not be published."""

    exit_code = 3
