"""Faults injected into the recording writer process (``WRecorder.writer_setup`` runs there, so these
live in a module that the spawned writer imports by name)."""
from __future__ import annotations

import errno
import os


def full_disk_after(step: int) -> None:
    """``os.write`` of duckling.recording.writer fails with ENOSPC for every step after ``step``."""
    import duckling.recording.writer as W
    real = W.RecordingWriter.append_step

    class FailingOs:
        armed = False

        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            if self.armed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.write(fd, data)

    fake = W.os = FailingOs()

    def append_step(self, s, *a, **k):
        fake.armed = s > step
        return real(self, s, *a, **k)
    W.RecordingWriter.append_step = append_step
