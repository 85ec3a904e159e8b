"""The Celery application of the transcoding service: `celery -A tasks worker`.

`app` is configured from `transcoder.settings`; the tasks are `transcoder.transcode` and
`transcoder.dest_fail` (`transcoder.deliver` only drops messages of older versions: deliveries
go through the job store's outbox). Importing the package also arms the worker's reaper (it
starts when a worker is ready, never in clients).
"""

from __future__ import annotations

from tasks import delivery, runtime, transcode
from tasks.app import app

__all__ = ["app", "delivery", "runtime", "transcode"]
