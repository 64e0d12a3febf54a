"""Progress as JSON lines on stdout (read by the Slicer module), or on stderr as tqdm bars, or as plain lines where
stderr is not a terminal (a cluster job's log): one at each stage and each tenth of its tiles or steps."""
import json
import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, mode: str = 'bar', stream: Optional[TextIO] = None):
        self.mode = mode  # 'json', 'bar' or 'none'
        self.stream = stream or sys.stdout
        self.case: Optional[str] = None
        self._bar = None
        self._stage: Optional[str] = None
        self._t0 = time.perf_counter()
        self.plain = mode == 'bar' and not sys.stderr.isatty()
        self._tenth = -1

    def emit(self, event: str, **fields) -> None:
        if self.mode == 'json':
            self.stream.write(json.dumps({'event': event, 'case': self.case, **fields}) + '\n')
            self.stream.flush()
        elif self.mode == 'bar' and event in ('warning', 'skip', 'result', 'failed', 'log'):
            print(fields.get('message') or fields, file=sys.stderr)

    def stage(self, name: str, case: Optional[str] = None, **fields) -> None:
        self.case = case if case is not None else self.case
        self._stage = name
        self._t0 = time.perf_counter()
        self._close_bar()
        self._tenth = -1
        self.emit('stage', stage=name, **fields)
        if self.plain:
            print(f'{time.strftime("%H:%M:%S")} {case + ": " if case else ""}{name}', file=sys.stderr,
                  flush=True)

    def tiles(self, k: int, n: int) -> None:
        """Tile k of n of the sliding window done."""
        self._count('tiles', 'tile', k, n)

    def steps(self, k: int, n: int) -> None:
        """Step k of n of the current stage (the evaluation's predictions) done."""
        self._count('steps', 'step', k, n)

    def _count(self, event: str, unit: str, k: int, n: int) -> None:
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / k * (n - k)
        if self.mode == 'json':
            self.emit(event, stage=self._stage, **{unit: k, event: n}, fraction=round(k / n, 4), eta_s=round(eta, 1))
        elif self.plain:
            tenth = k * 10 // n
            if tenth > self._tenth:
                self._tenth = tenth
                print(f'{time.strftime("%H:%M:%S")} {self.case}: {self._stage} {k}/{n} {unit}s, about {eta:.0f} s left',
                      file=sys.stderr, flush=True)
        elif self.mode == 'bar':
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=n, desc=f'{self.case} {self._stage}', unit=unit, file=sys.stderr)
            self._bar.total = n
            self._bar.update(k - self._bar.n)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._close_bar()
