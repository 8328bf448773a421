"""How the distillation's processes agree on an outcome (DeCLIP training, docs/method.md §6): a step that can fail on
one process (a checkpoint save, the main process's evaluation) ends with one collective at which every process
learns whether any failed, so they all stop with the same error instead of the others waiting forever at the next
barrier."""

import errno

from accelerate.utils import gather_object


def failure_of(action) -> str:
    """Run `action`; "" when it succeeds, else what went wrong, in words, for `first_failure`. Any error counts:
    whatever one process raises, the others must hear of it rather than wait."""
    try:
        action()
    except OSError as error:
        return "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else str(error)
    except Exception as error:  # noqa: BLE001 - reported to every process, then raised there as one error
        return f"{type(error).__name__}: {error}"
    return ""


def first_failure(accelerator, error: str) -> str:
    """The first process's error ("" when every process passes "", i.e. none failed), known to every process.

    Every process must call this at the same point (it is a collective), each with its own error message or "".
    With several processes the message names the process it came from.
    """
    errors = gather_object([error])  # one entry per process, in process order; the list itself on one process
    for process_index, message in enumerate(errors):
        if message:
            return message if accelerator.num_processes == 1 else f"{message}; on process {process_index}"
    return ""


class FailedOnEveryProcess(RuntimeError):
    """An error every process raises at the same point, right after `first_failure` agreed on it: the processes are
    still in step, so they can meet at one last barrier (the main process prints the error line first)."""
