"""The core as a background process: lines are read on threads and handed over by poll() on the caller's thread
(Slicer's main thread, from a timer), so MRML is only touched there. Cancel kills the whole process tree."""
import collections
import json
import os
import signal
import subprocess
import threading
import time
from typing import Callable, List, Optional, Sequence


class CoreProcess:
    """One `python -m nnunetv2_cam_core ...` run. poll() returns the new events: JSON objects from stdout
    (`--progress json`) and {'event': 'log', 'stream': ..., 'message': line} for every other line."""

    def __init__(self, command: Sequence[str], env: Optional[dict] = None, cwd: Optional[str] = None):
        self.command = [str(c) for c in command]
        self._lines: collections.deque = collections.deque()
        posix = os.name == 'posix'
        self._process = subprocess.Popen(
            self.command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding='utf-8', errors='replace', bufsize=1,
            start_new_session=posix,  # its own process group: cancel reaches nnU-Net's workers too
            creationflags=0 if posix else subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW)
        self._readers = [threading.Thread(target=self._read, args=(s, j), daemon=True)
                         for s, j in ((self._process.stdout, True), (self._process.stderr, False))]
        self.cancelled = False
        for t in self._readers:
            t.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _read(self, stream, is_stdout: bool) -> None:
        for line in stream:
            line = line.rstrip('\n')
            if not line:
                continue
            event = None
            if is_stdout and line.startswith('{'):
                try:
                    event = json.loads(line)
                except ValueError:
                    pass
            self._lines.append(event if isinstance(event, dict) and 'event' in event else
                               {'event': 'log', 'stream': 'stdout' if is_stdout else 'stderr', 'message': line})
        stream.close()

    def keep_last(self, n: int) -> None:
        """From now on hold the last `n` events only, for a process whose output nobody polls (the local server
        after its start): its lines are still read, so it never blocks on a full pipe."""
        lines = self._lines
        self._lines = collections.deque(maxlen=n)
        while lines:  # what the readers appended meanwhile goes over too
            self._lines.append(lines.popleft())

    def poll(self) -> List[dict]:
        out = []
        while True:
            try:
                out.append(self._lines.popleft())
            except IndexError:
                return out

    @property
    def returncode(self) -> Optional[int]:
        """None while running or while output is still being read."""
        if self._process.poll() is None or any(t.is_alive() for t in self._readers):
            return None
        return self._process.returncode

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for t in self._readers:
            t.join(timeout=5)
        return self.returncode

    def cancel(self, grace_s: float = 1.0) -> None:
        """Terminate the process tree, and kill it if it is still alive after grace_s."""
        if self._process.poll() is not None:
            return
        self.cancelled = True
        self._signal_tree(kill=False)
        deadline = time.monotonic() + grace_s
        while self._process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._signal_tree(kill=True)
        self._process.wait(5)
        for t in self._readers:
            t.join(timeout=2)

    def _signal_tree(self, kill: bool) -> None:
        if os.name == 'posix':
            try:
                os.killpg(self._process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif kill or self._process.poll() is None:
            subprocess.run(['taskkill', '/T', '/F', '/PID', str(self._process.pid)], capture_output=True)


def stdout_of(events: List[dict]) -> str:
    """The plain (non-event) lines a core call printed on stdout, e.g. the JSON of --list-layers or check-env."""
    return '\n'.join(e['message'] for e in events if e.get('stream') == 'stdout')


def run_to_end(command: Sequence[str], env: Optional[dict] = None, timeout: float = 300,
               event_pump: Optional[Callable[[], None]] = None) -> tuple:
    """A short core call (check-env, --list-methods, --list-layers): (returncode, events). `event_pump` is called
    every 50 ms while waiting (in Slicer, slicer.app.processEvents, so the GUI stays responsive)."""
    p = CoreProcess(command, env)
    deadline = time.monotonic() + timeout
    rc = None
    while rc is None and time.monotonic() < deadline:
        rc = p.wait(0.05 if event_pump else max(deadline - time.monotonic(), 0))
        if rc is None and event_pump:
            event_pump()
    if rc is None:
        p.cancel()
        return None, p.poll() + [{'event': 'error', 'message': f'no answer within {timeout:.0f} s: '
                                                               f'{" ".join(command[:4])} ...'}]
    return rc, p.poll()

