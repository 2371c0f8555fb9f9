"""Telling someone a pipeline run failed: a JSON POST to a webhook (`pipeline.notify_url`).

The body carries `text` (what Slack, Mattermost and Teams' incoming webhooks show) and the same
facts as fields for anything else that reads it. A notification that cannot be delivered is
logged, never raised: the run's own error is the one to report.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from flows.dvc import StageFailed

log = logging.getLogger("vqpipe.notify")
TIMEOUT_SECONDS = 10


def failure_message(repo: Path, flow_run_id: str, flow_run_name: str, err: BaseException) -> dict:
    if isinstance(err, StageFailed):
        stage, summary, tail = err.stage, f"stage {err.stage!r} failed (exit {err.code})", "\n".join(err.lines[-10:])
    else:
        stage, summary, tail = None, f"{type(err).__name__}: {err}", ""
    run = flow_run_name or flow_run_id or "(local)"
    text = f"vqpipe pipeline run {run} failed in {repo} on {socket.gethostname()}: {summary}"
    return {
        "text": text + (f"\n```\n{tail}\n```" if tail else ""),
        "status": "failed",
        "repo": str(repo),
        "host": socket.gethostname(),
        "flow_run_id": flow_run_id,
        "flow_run_name": flow_run_name,
        "stage": stage,
        "error": summary,
    }


def notify_failure(url: str, repo: Path, flow_run_id: str, flow_run_name: str, err: BaseException) -> bool:
    """POST the failure to `url`; whether it was accepted (2xx)."""
    body = json.dumps(failure_message(repo, flow_run_id, flow_run_name, err)).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            ok = 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError) as problem:
        log.warning("could not notify %s of the failed run: %s", _host(url), problem)
        return False
    if not ok:
        log.warning("%s answered %s to the failure notification", _host(url), response.status)
    return ok


def _host(url: str) -> str:
    """The webhook's host only: its path is often the secret."""
    return urllib.parse.urlsplit(url).netloc or "the webhook"
