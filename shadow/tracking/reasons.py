"""Why something was not used: the one home of the shadow's skip, drop and refusal reasons.

Each enum is the value set of one metric's `reason` label (see `vllm_shadow.readout.metric_table`), so a value
is written once, here, and the exporter can emit every reason of a counter from the start (0 until it
happens): a rule or dashboard can rate() any reason without guarding against a series that does not exist yet.
"""

from __future__ import annotations

from enum import StrEnum


class SkipReason(StrEnum):
    """Why a window was not evaluated (`vllm_shadow_windows_skipped_total`)."""

    # The tracker's (per engine).
    LOST_EVENTS = "lost_events"  # a gap in the stream made the engine state the window starts from unknown
    REQUEST_TIMEOUT = "request_timeout"  # a running request went unscheduled too long: its end was lost
    ENGINE_SILENT = "engine_silent"  # no events for too long: the live state was dropped
    ENGINE_RESTART = "engine_restart"  # the engine announced itself again: what it held is gone
    BACKLOG = "backlog"  # too many closed windows waiting for their requests to finish
    TOO_LARGE = "too_large"  # the engine held more requests than a window may
    REUSED_ID = (
        "reused_id"  # a finished request's id came back for a new request while windows held the first
    )
    # The evaluation stage's (shadow-wide queue and tasks).
    EVALUATION_BACKLOG = "evaluation_backlog"  # dropped from a full evaluation queue
    EVALUATION_TIMEOUT = "evaluation_timeout"  # cancelled at the evaluation time-out
    EVALUATION_ERROR = "evaluation_error"  # the self replay failed, so nothing can be compared
    SUPERSEDED = "superseded"  # a request-only tracker replaced by a step-level one for the same engine


class UnattributedReason(StrEnum):
    """Why events reached no engine (`vllm_shadow_events_unattributed_total`)."""

    NO_ENGINE_INFO = "no_engine_info"  # the sender never announced its engine
    DUPLICATE_SOURCE = "duplicate_source"  # a second sender for an engine already mirrored
    TOO_MANY_SOURCES = "too_many_sources"  # a new sender while max_sources senders were all recently heard
    TOO_MANY_ENGINES = "too_many_engines"  # a new engine while max_engines engines were all recently heard


class DropReason(StrEnum):
    """Why events were lost on the way (`vllm_shadow_events_dropped_total`)."""

    SENDER_QUEUE = "sender_queue"  # the engine side's bounded queue was full
    LATE = "late"  # arrived after the sequencer gave their batch up
    STRAY = "stray"  # a sequence number too far from the sender's stream to be a gap (forged or corrupt)


class LostRequestReason(StrEnum):
    """Why a request's outcome is unknown (`vllm_shadow_requests_lost_total`)."""

    TIMED_OUT = "timed_out"  # running, but unscheduled for longer than a running request can be
    ABANDONED = "abandoned"  # live when the engine went silent or restarted
    REJECTED = "rejected"  # arrived beyond the tracker's bound on live requests
    UNKNOWN = "unknown"  # named by a step or finish, but its arrival was lost
    LATE = "late"  # request-only sources: reported after its window was evaluated


class RefusalReason(StrEnum):
    """Why a transport refused a batch before decoding it (`vllm_shadow_batches_refused_total`)."""

    MALFORMED = "malformed"
    INVALID = "invalid"  # a well-formed batch with an impossible number (adapters.validation)
    OVERSIZED = "oversized"
    UNAUTHENTICATED = "unauthenticated"
    SINK_FAILURE = "sink_failure"
    INCOMPLETE_SPAN = "incomplete_span"
