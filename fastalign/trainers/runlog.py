"""One run per output folder: the folder's lock, and the run's metrics files (one per run segment).

The lock is ``fcntl.flock`` on ``<output_dir>/.fastalign.lock``, held for the whole of ``train()``; the file
records who holds it (pid, host, process start time, run id) so that a second run can say whose it is. The
kernel drops a flock when its process dies, so a killed run leaves no lock behind; a lock file whose process is
gone (same host) is taken over with a warning.

Metrics: each train() call writes its own file (``metrics.jsonl``, then ``metrics-1.jsonl``, ... for the
segments that follow a resume); every row carries the run id, which a resumed run takes over from its
checkpoint, and the segment number. Rows are written whole (one write of one line; a failed write is cut
back), and a torn last line left by a kill is dropped at the next start."""
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings

from fastalign.checkpoint import NoSpaceLeftError, RunStateError

LOCK_FILE = ".fastalign.lock"
METRICS_FILE = re.compile(r"^metrics(?:-(\d+))?\.jsonl$")


def new_run_id():
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _process_start(pid):
    """The process's start time (clock ticks since boot) from /proc, to tell a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(holder):
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _describe(holder):
    if not holder:
        return "a process that left no record"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f", run {holder['run_id']}" if holder.get("run_id") else ""))


class OutputDirLock:
    """Exclusive use of an output folder by one run (``acquire``/``release``; a context manager too)."""

    def __init__(self, output_dir, run_id=None):
        self.output_dir, self.run_id = output_dir, run_id
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.fd = None

    def _holder(self, fd):
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except (OSError, ValueError):
            return None

    def _refuse(self, fd, holder, why=""):
        os.close(fd)
        raise RunStateError(
            f"output_dir {self.output_dir} is in use by another run ({_describe(holder)}){why}: two runs must "
            "never share an output folder. Wait for that run to end, stop it, or pass another output_dir")

    def acquire(self):
        os.makedirs(self.output_dir, exist_ok=True)
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            holder = None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise
                holder = self._holder(fd)
                if holder and holder.get("host") == host and not _alive(holder):
                    # held by a child that inherited the descriptor of a dead run: replace the file
                    warnings.warn(f"taking over the lock of {self.output_dir} from a run that is no longer running "
                                  f"({_describe(holder)})", stacklevel=7)
                    os.close(fd)
                    os.unlink(self.path)
                    continue
                self._refuse(fd, holder)
            try:  # the file may have been replaced while we waited for it: lock the one at the path
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            holder = self._holder(fd)
            if holder and holder.get("pid") != os.getpid():
                if holder.get("host") == host and _alive(holder):  # flock had no effect (some network file systems)
                    self._refuse(fd, holder, " (its lock record says so although the file system granted the lock)")
                if holder.get("host") != host:
                    self._refuse(fd, holder, f"; if it is no longer running, delete {self.path}")
                warnings.warn(f"taking over the stale lock of {self.output_dir} left by a run that is no longer "
                              f"running ({_describe(holder)})", stacklevel=7)  # points at the caller of train()
            self.fd = fd
            self._record = {"pid": os.getpid(), "host": host, "process_start": _process_start(os.getpid()),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "run_id": self.run_id}
            self._write_record()
            return self

    def _write_record(self):
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(self._record).encode(), 0)
        os.fsync(self.fd)

    def note_run(self, run_id):
        """Record the run id (known once a resumed checkpoint has been read) for a second run's error."""
        self.run_id = self._record["run_id"] = run_id
        self._write_record()

    def release(self):
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def metrics_files(output_dir):
    """The metrics files of ``output_dir`` in segment order, as (segment, path)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1) or 0), os.path.join(output_dir, name))
             for name in os.listdir(output_dir) for m in [METRICS_FILE.match(name)] if m]
    return sorted(found)


def repair_metrics(output_dir):
    """Drop a torn last line (no newline, or not JSON) from each metrics file; returns one line per repair."""
    actions = []
    for _, path in metrics_files(output_dir):
        with open(path, "rb+") as f:
            data = f.read()
            cut = len(data)
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
            else:
                last = data[data.rfind(b"\n", 0, len(data) - 1) + 1:]
                try:
                    json.loads(last or b"null")
                except ValueError:
                    cut = data.rfind(b"\n", 0, len(data) - 1) + 1
            if cut != len(data):
                f.truncate(cut)
                actions.append(f"dropped a torn last line from {path} ({len(data) - cut} bytes)")
    return actions


def metrics_run_id(path):
    """The run id of a metrics file's rows (its first row's), or None for an empty or unreadable file."""
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    return json.loads(line).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return None


def read_metrics(output_dir):
    """The rows of all segments as one history: a later segment's training rows replace an earlier segment's rows
    from the later segment's first training step on (a resumed run repeats the steps after its checkpoint). A
    segment without training rows (evaluate() outside train()) replaces nothing: its rows are added."""
    rows = []
    for _, path in metrics_files(output_dir):
        with open(path) as f:
            seg = [json.loads(line) for line in f if line.strip()]
        trained = [r.get("step", 0) for r in seg if "loss" in r]
        if trained:
            rows = [r for r in rows if r.get("step", 0) < min(trained)] + seg
        else:
            rows = rows + seg
    return rows


class RunLog:
    """The metrics file of one run segment: the next free segment number in ``output_dir``."""

    def __init__(self, output_dir, run_id):
        self.output_dir, self.run_id = output_dir, run_id
        taken = [s for s, _ in metrics_files(output_dir)]
        self.segment = max(taken) + 1 if taken else 0
        name = "metrics.jsonl" if self.segment == 0 else f"metrics-{self.segment}.jsonl"
        self.path = os.path.join(output_dir, name)

    def write(self, row):
        """Append one row as one whole line (a failed write is cut back, so no torn line stays)."""
        os.makedirs(self.output_dir, exist_ok=True)
        line = (json.dumps({"run_id": self.run_id, "segment": self.segment, **row}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                done = 0
                while done < len(line):
                    done += os.write(fd, line[done:])
            except OSError as exc:
                os.ftruncate(fd, size)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    free = shutil.disk_usage(self.output_dir).free / (1 << 20)
                    raise NoSpaceLeftError(f"no space left on device while writing {self.path} (about "
                                           f"{len(line) / (1 << 20):.2f} MB needed, {free:.0f} MB free)") from exc
                raise
        finally:
            os.close(fd)
