"""Reporting why a Job's attempt failed, even when S3 cannot take the failure record.

The operator learns why an attempt failed from the failure record in S3 (``failures/attempt-<n>.json``). Writing it
can fail too (S3 is down: often the very reason the attempt failed), so the reason also goes to

* stderr, as an ERROR log line (``kubectl logs``), and
* the container's termination message (``/dev/termination-log``, which Kubernetes shows in the pod's status and in
  ``kubectl describe pod``), saying whether the record was written.

The operator then records the Job's own failure condition for that attempt (``record_job_end``). The local Job runner
(development only) has no pods: it points ``LANGMERGE_TERMINATION_MESSAGE_PATH`` at a file of its own and puts the
message into the Job's Failed condition.
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

from langmerge.artifacts import FailureRecord
from langmerge.store import ObjectStore

log = logging.getLogger(__name__)

ENV_TERMINATION_MESSAGE_PATH = "LANGMERGE_TERMINATION_MESSAGE_PATH"
#: Kubernetes' default ``terminationMessagePath`` (the Job builders set it explicitly).
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
#: Kubernetes keeps at most this many bytes of a termination message.
MAX_TERMINATION_MESSAGE_BYTES = 4096


def termination_message_path() -> Path:
    return Path(os.environ.get(ENV_TERMINATION_MESSAGE_PATH) or DEFAULT_TERMINATION_MESSAGE_PATH)


def write_termination_message(message: str) -> bool:
    """Write ``message`` (at most 4 KiB) where Kubernetes reads a container's termination message.

    Kubernetes creates that file in every container; where it does not exist (a developer's machine) nothing is
    written and False is returned.
    """
    path = termination_message_path()
    if not path.is_file():
        return False
    data = message.encode("utf-8", "replace")[:MAX_TERMINATION_MESSAGE_BYTES]
    try:
        path.write_bytes(data)
    except OSError as err:
        log.warning("could not write the termination message to %s: %s", path, err)
        return False
    return True


def failure_record(err: BaseException, *, fingerprint: str, attempt: int | None, retryable: bool) -> FailureRecord:
    return FailureRecord(
        fingerprint=fingerprint,
        error_class=type(err).__name__,
        message=str(err) or type(err).__name__,
        traceback_tail="".join(traceback.format_exception(err))[-4000:],
        retryable=retryable,
        attempt=attempt,
    )


def report_failure(store: ObjectStore, uri: str, record: FailureRecord, *, what: str) -> bool:
    """Write ``record`` to ``uri`` (``store`` retries S3 for a bounded time) and say why the attempt failed on stderr
    and in the termination message, including when the record could not be written. True if it was written."""
    reason = f"{what} failed ({record.error_class}): {record.message}"
    kind = "" if record.retryable else " [not retryable]"
    try:
        store.put_json(uri, record)
    except Exception as put_err:
        note = f"the failure record could not be written to {uri}: {type(put_err).__name__}: {put_err}"
        log.error("%s%s; %s", reason, kind, note)
        write_termination_message(f"{reason}{kind}\n{note}\n")
        return False
    log.error("%s%s; recorded at %s", reason, kind, uri)
    write_termination_message(f"{reason}{kind}\nrecorded at {uri}\n")
    return True
