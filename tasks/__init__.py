"""The Celery application of the transcoding service: `celery -A tasks worker`.

`app` is configured from `transcoder.settings`; the tasks are `transcoder.transcode`,
`transcoder.deliver` and `transcoder.dest_fail`. Importing the package also arms the
worker's reaper (it starts when a worker is ready, never in clients).
"""

from __future__ import annotations

from tasks import delivery, runtime, transcode
from tasks.app import app

__all__ = ["app", "delivery", "runtime", "transcode"]
