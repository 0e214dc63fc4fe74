"""Whole-process-tree memory, sampled in a background thread while a benchmark runs.

PSS (from /proc/<pid>/smaps_rollup) splits every shared page — libraries, and Ray's object store, a shared
mapping in /dev/shm that the raylet and the workers map — among the processes that map it, so the PSS sum
is what the tree really holds. The RSS sum counts each shared page once per process that maps it: an upper
bound, reported because it is what `ps` and most monitors add up.

Ray's object store is a deleted file in /dev/shm that the raylet holds open: its pages stay allocated (the
store's allocator reuses them, it does not give them back) whether or not a process has them mapped at the
moment, so PSS alone would miss the pages of objects whose readers have moved on. The total counts the
store's allocated size (`st_blocks` of the file, through the holder's fd) in place of the part of PSS in
shared memory (`Pss_Shmem`), whichever is larger.

An embedded Ray cluster (`ray.init(address="local")`) is a child of its driver: the GCS, the raylet (which
holds the object store), the dashboard and monitors, and the workers (children of the raylet) all descend from
the driver's pid. A cluster started by `ray start` is not: sample its raylet's pid as a second root.

    with TreeMemory() as mem:
        work()
    print(mem.peak_pss / 2**30, mem.by_kind)
"""
from __future__ import annotations

import os
import threading
from collections import defaultdict
from pathlib import Path

FIELDS = {"Rss:": "rss", "Pss:": "pss", "Pss_Shmem:": "shmem"}


def descendants(roots: list[int]) -> list[int]:
    """The roots and every process below them (one pass over /proc's parent links)."""
    children = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the command name may hold spaces and parentheses: the ppid comes after the last ")"
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            children[ppid].append(int(entry.name))
    seen, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(children.get(pid, ()))
    return seen


def usage(pid: int) -> dict[str, int] | None:
    """Rss, Pss and Pss_Shmem of one process, in bytes; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out = dict.fromkeys(FIELDS.values(), 0)
    for line in text.splitlines():
        key, *rest = line.split()
        if key in FIELDS:
            out[FIELDS[key]] = int(rest[0]) * 1024
    return out


def shm_files(pid: int) -> dict[tuple[int, int], int]:
    """The /dev/shm files a process holds open (Ray's object store), each with its allocated bytes."""
    out = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith("/dev/shm/"):
                st = os.stat(path)
                out[st.st_dev, st.st_ino] = st.st_blocks * 512
        except OSError:
            continue
    return out


def kind(pid: int, root: int) -> str:
    """A process's role in a Ray tree, for the per-kind breakdown."""
    if pid == root:
        return "driver"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    head = argv[0].decode(errors="replace")
    if head.startswith("ray::"):  # a worker's title: ray::IDLE, ray::MapWorker(...), ray::DashboardAgent
        return head.split()[0]
    for arg in argv[:3]:  # an executable (raylet, gcs_server) or a python script (dashboard.py, monitor.py)
        name = Path(arg.decode(errors="replace")).name
        if name and name not in ("python", "python3") and not name.startswith("-"):
            return name.removesuffix(".py")
    return head


class TreeMemory:
    """Samples the process tree under `roots` (default: this process) every `interval` seconds; keeps the peak
    total (PSS sum with the object store counted whole, see above), the peak RSS sum, the object store's peak
    allocated size, and the per-kind split at the moment of the total's peak."""

    def __init__(self, roots: list[int] | None = None, interval: float = 0.5):
        self.roots, self.interval = roots or [os.getpid()], interval
        self.peak_pss = self.peak_rss = self.peak_store = 0
        self.by_kind: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                self.sample()  # the last moment counts too
                return

    def sample(self) -> None:
        kinds: dict[str, dict[str, int]] = defaultdict(lambda: {"n": 0, "pss": 0, "rss": 0, "shmem": 0})
        files: dict[tuple[int, int], int] = {}
        for pid in descendants(self.roots):
            mem = usage(pid)
            if mem is None:
                continue
            files.update(shm_files(pid))
            k = kinds[kind(pid, self.roots[0])]
            k["n"] += 1
            for field, value in mem.items():
                k[field] += value
        store = sum(files.values())
        unmapped = max(0, store - sum(k["shmem"] for k in kinds.values()))
        pss = sum(k["pss"] for k in kinds.values()) + unmapped
        self.peak_rss = max(self.peak_rss, sum(k["rss"] for k in kinds.values()))
        self.peak_store = max(self.peak_store, store)
        if pss > self.peak_pss:
            self.peak_pss, self.by_kind = pss, dict(kinds)
            if unmapped:
                self.by_kind["object store, unmapped part"] = {"n": 0, "pss": unmapped, "rss": 0, "shmem": unmapped}

    def table(self) -> str:
        """The per-kind split at the PSS peak, largest first (MiB)."""
        rows = sorted(self.by_kind.items(), key=lambda kv: -kv[1]["pss"])
        lines = [f"  {'process':<44} {'n':>3} {'PSS MiB':>8} {'shm MiB':>8} {'RSS MiB':>8}"]
        lines += [f"  {name[:44]:<44} {k['n']:>3} {k['pss'] / 2**20:>8.0f} {k['shmem'] / 2**20:>8.0f} "
                  f"{k['rss'] / 2**20:>8.0f}" for name, k in rows]
        return "\n".join(lines)
