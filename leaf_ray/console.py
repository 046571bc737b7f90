"""A quiet terminal: Ray's, Ray Data's, Ray Train's, MLflow's and transformers' own output goes to one log file in
the run directory (`<run dir>/logs/ray.log`), not the terminal, so the console shows leaf-ray's progress lines,
summaries and tables only.

The CLI turns this on for every verb (`--verbose` turns it off); library callers (tests, `jobs/`) keep Ray's
defaults unless they call `enable()`. What is routed:

- Python logging of the libraries in `LOGGERS` (their own terminal handlers removed, `propagate` off) and Python
  `warnings` (`logging.captureWarnings`): into the log file. A message logged before the run directory is known
  is buffered and written once `attach(path)` names the file.
- The output of Ray workers and actors (what `ray.init(log_to_driver=True)` would print on the driver, e.g. Ray
  Train's `PlacementGroupCleaner` warnings and every worker's prints): into the same file, through the driver's
  log dispatcher (`route_worker_logs`). Where that hook is missing, `init_ray` falls back to
  `log_to_driver=False` (worker output then stays in Ray's session directory, `/tmp/ray/session_latest/logs`).
- Ray Data's progress bars off (`DataContext.enable_progress_bars`), transformers' progress bars and advisory
  warnings off, also in workers (`worker_env_vars`).

Errors are never hidden: exceptions propagate as before, and `print_failure` shows the error and the log path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import IO

LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "alembic", "transformers",
           "DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "filelock", "py.warnings")
LOG_NAME = "logs/ray.log"

_state: dict = {"enabled": False, "path": None, "handler": None, "saved": {}}
_lock = threading.Lock()


def enabled() -> bool:
    return _state["enabled"]


def log_path() -> Path | None:
    return _state["path"]


def run_log_path(run_dir: Path) -> Path:
    return Path(run_dir).expanduser().resolve() / LOG_NAME


class _RunLogHandler(logging.Handler):
    """Writes records to the run's log file; buffers them until the file is known."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.buffer: list[str] = []
        self.stream: IO[str] | None = None

    def write_line(self, line: str) -> None:
        with _lock:
            if self.stream is None:
                self.buffer.append(line)
                del self.buffer[:-5000]  # bounded while no file is attached
            else:
                self.stream.write(line + "\n")
                self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock:
            if self.stream is not None:
                self.stream.close()
            self.stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process
            self.stream.write(f"--- leaf-ray {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")
            self.stream.writelines(line + "\n" for line in self.buffer)
            self.buffer.clear()
            self.stream.flush()


def worker_env_vars() -> dict[str, str]:
    """Environment for Ray workers while the console is quiet: no progress bars, no advisory warnings."""
    if not enabled():
        return {}
    return {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}


_add_handler = logging.Logger.addHandler


def _terminal(handler: logging.Handler) -> bool:
    import sys

    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


def _quiet_add_handler(self: logging.Logger, handler: logging.Handler) -> None:
    """A library imported later (deepspeed, ray.data, ...) adding a terminal handler to one of `LOGGERS`:
    its records go to the run log instead."""
    if _state["enabled"] and self.name in LOGGERS and _terminal(handler):
        if _state["handler"] not in self.handlers:
            _add_handler(self, _state["handler"])
        self.propagate = False
        return
    _add_handler(self, handler)


def enable() -> None:
    """Route the libraries' logging and warnings away from the terminal (idempotent)."""
    if _state["enabled"]:
        return
    handler = _RunLogHandler()
    _state.update(enabled=True, handler=handler)
    logging.Logger.addHandler = _quiet_add_handler
    for name in LOGGERS:
        logger = logging.getLogger(name)
        _state["saved"][name] = (list(logger.handlers), logger.propagate, logger.level)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    logging.captureWarnings(True)
    os.environ.update({k: v for k, v in worker_env_vars().items() if k != "PYTHONWARNINGS"})
    quiet_libraries()


def quiet_libraries() -> None:
    """Settings that imported libraries re-read: call again after importing ray.data / transformers."""
    if not enabled():
        return
    import sys

    try:  # only when imported: enable() is cheap; before the import the environment (worker_env_vars) does it
        if "transformers" not in sys.modules:
            raise ImportError
        import transformers.utils.logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        hf_logging.disable_default_handler()
        hf_logging.add_handler(_state["handler"])
    except Exception:  # noqa: BLE001, S110 - transformers missing or its API moved: output stays put
        pass
    try:
        if "ray" not in sys.modules:
            raise ImportError
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.use_ray_tqdm = False
        ctx.print_on_execution_start = False
    except Exception:  # noqa: BLE001, S110 - an older ray.data: its bars stay on
        pass
    # ray, ray.data, ... configure their own terminal handlers when imported: take the loggers back
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if h is not _state["handler"]:
                logger.removeHandler(h)
        if _state["handler"] not in logger.handlers:
            logger.addHandler(_state["handler"])
        logger.propagate = False


def attach(run_dir: Path) -> Path | None:
    """Write the routed output to `<run_dir>/logs/ray.log` from now on (the first call wins)."""
    if not enabled():
        return None
    if _state["path"] is None:
        path = run_log_path(run_dir)
        _state["handler"].open(path)
        _state["path"] = path
    return _state["path"]


def route_worker_logs() -> bool:
    """After `ray.init(log_to_driver=True)`: send the workers' output to the run log instead of the terminal.
    Returns False when Ray's dispatcher hook is not there (the caller then uses `log_to_driver=False`)."""
    if not enabled():
        return False
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    handler = _state["handler"]

    def to_file(data: dict) -> None:
        prefix = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')}) "
        for line in data.get("lines", []):
            handler.write_line(prefix + line)

    try:
        dispatcher.remove_handler("ray_print_logs")
    except Exception:  # noqa: BLE001
        return False
    dispatcher.add_handler("leaf_ray_run_log", to_file)
    return True


def can_route_worker_logs() -> bool:
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    return hasattr(dispatcher, "remove_handler") and hasattr(dispatcher, "add_handler")


def disable() -> None:
    """Undo `enable()` (tests)."""
    if not _state["enabled"]:
        return
    logging.Logger.addHandler = _add_handler
    for name, (handlers, propagate, level) in _state["saved"].items():
        logger = logging.getLogger(name)
        logger.removeHandler(_state["handler"])
        for h in handlers:
            logger.addHandler(h)
        logger.propagate, logger.level = propagate, level
    logging.captureWarnings(False)
    if _state["handler"].stream is not None:
        _state["handler"].stream.close()
    _state.update(enabled=False, path=None, handler=None, saved={})


class FileProgress:
    """``with FileProgress(path, label, console): work()``: one rich progress line that follows a JSON file
    another process rewrites (``{"step", "total_steps", "loss", ...}``, e.g. rank 0 of a Ray Train run), polled
    in a thread; no line when ``console`` is None."""

    def __init__(self, path: Path, label: str, console, interval_s: float = 0.5):
        self.path, self.label, self.console, self.interval_s = Path(path), label, console, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.console is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return False

    def _read(self) -> dict | None:
        import json

        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _run(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(self.label, markup=False), BarColumn(bar_width=24), MofNCompleteColumn(),
                      TextColumn("steps ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                      console=self.console, transient=False) as progress:
            task = None
            while True:
                stopping = self._stop.wait(self.interval_s)
                state = self._read()
                if state and state.get("total_steps"):
                    if task is None:  # a resumed run starts at its checkpoint: ETA from the steps done here
                        task = progress.add_task(self.label, total=state["total_steps"],
                                                 completed=state["step"], info="")
                    info = f"loss {state['loss']:.4f}" if state.get("loss") is not None else ""
                    if state.get("val_loss") is not None:
                        info += f"  best val {state['val_loss']:.4f}"
                    progress.update(task, completed=state["step"], info=info)
                if stopping:
                    return


def print_failure(console, error: BaseException, what: str = "the run") -> None:
    """The error of a failing stage, where the full traceback and Ray's output are (the log file)."""
    import traceback

    from rich.markup import escape

    text = str(error) or type(error).__name__
    lines = text.splitlines()
    if len(lines) > 25:
        text = "\n".join(lines[:10] + ["…"] + lines[-14:])
    console.print(f"[red]error[/red] in {what}: {type(error).__name__}: {escape(text)}", highlight=False)
    path = log_path()
    if path is not None:
        _state["handler"].write_line("".join(traceback.format_exception(error)))
        console.print(f"full traceback and Ray's output: {path}", highlight=False)

