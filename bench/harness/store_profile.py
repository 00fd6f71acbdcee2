"""Where a C-STORE's CPU goes: a loaded `stowage serve` profiled by stage, in µs per instance.

    python -m stowage.bench.harness.store_profile [--kind small --count 10000 | --corpus DIR] \
        [--associations 4] [--perf] [--out DIR]
    python -m stowage.bench.harness.store_profile --report DIR [DIR ...]   # runs kept with --out, pooled

Starts `stowage serve` (this checkout, fsync on) fresh, waits until it has settled, then
sends the corpus with DCMTK storescu over K associations while `py-spy record --native
--subprocesses` samples it and, with `--perf`, `perf record -g` samples its kernel side.
The receiver's process tree CPU over the send, user and system apart, is the total. A
user-space stage's µs per instance is its share of py-spy's user-space samples times the
user CPU per instance; samples taken in a system call, a lock or the GIL are set aside (py-spy
cannot tell a blocked thread from a running one when it unwinds native stacks), and the
system CPU is split by perf, by the kernel code on each sample's chain. Samples are classified
by the frames of their stack (STAGES: the first rule any frame matches), each stage marked
as ours or a library's. Needs py-spy, perf (with --perf) and DCMTK.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from stowage.bench.corpus import generate
from stowage.bench.harness import ingest
from stowage.bench.harness.receivers import RECEIVERS
from stowage.bench.procs import free_port, stop_tree

# (stage, owner, pattern over one frame): the first rule that any frame of a stack matches
# names its stage, so rules of a context (a background thread, the tail append) come
# before those of what runs inside it (msgpack, a system call).
STAGES: list[tuple[str, str, str]] = [
    ("seal (background thread)", "ours + pyarrow", r"_seal_loop"),
    ("learning other workers' UIDs (background thread)", "ours", r"_learn_loop"),
    ("association set-up and release", "ours", r"protocol/acse\.py|receive/negotiation\.py|workers/association\.py"),
    ("catalog tail append (msgpack, write)", "ours", r"catalog/tail\.py|commit \(.*catalog/sealer\.py"),
    ("fdatasync (its call)", "ours", r"fdatasync"),
    ("segment write (its call)", "ours", r"_writev \(|_write_all \(|_copy \(.*writer\.py"),
    ("group commit (queue, locks, hand-offs)", "ours", r"engine/store/writer\.py"),
    ("pydicom (charset decoding of values)", "pydicom", r"/pydicom/"),
    ("pynetdicom (DIMSE/ACSE)", "pynetdicom", r"/pynetdicom/"),
    ("catalog attributes: element walk and values", "ours", r"catalog/attributes\.py"),
    ("byte shuffle and zstd", "ours + zstd", r"_payload \(|ZSTD|zstd|shuffle"),
    ("record encoding (header msgpack, file meta, CRC-32)", "ours", r"record_parts|file_meta|packb"),
    ("CRC-32 of the data set", "isa-l", r"_crc32 \(|crc32"),
    ("duplicate filters (Bloom, sealed UIDs)", "ours", r"catalog/bloom\.py|sealed_uids\.py|cluster_view\.py|__contains__|may_hold"),
    ("audit line and counters", "ours", r"runtime/audit\.py|runtime/counts\.py|engine/metrics\.py"),
    ("response (encode, send)", "ours", r"store_response|^p_data \(|^_send \(.*ingest\.py"),
    ("PDU read (recv)", "ours", r"protocol/pdu\.py"),
    ("command decode (DIMSE)", "ours", r"protocol/dimse\.py"),
    ("rest of Archive.store (checks, row, free space, quota)", "ours", r"engine/store/archive\.py|freespace\.py|usage\.py|served_versions\.py|rejection\.py"),
    ("PDV loop and StorageSCP", "ours", r"engine/receive/ingest\.py|engine/receive/store\.py|engine/receive/spill\.py"),
]
_RULES = [(name, owner, re.compile(p)) for name, owner, p in STAGES]
OTHER = ("other (acceptor, idle loops, interpreter)", "")


def classify(frames: list[str]) -> tuple[str, str]:
    for name, owner, rule in _RULES:
        if any(rule.search(f) for f in frames):
            return name, owner
    return OTHER


def read_raw(path: Path) -> collections.Counter:
    """py-spy's raw output: 'frame;frame;... count' per line -> Counter of stack tuples."""
    stacks: collections.Counter = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


# System time by what the kernel was doing, from each perf sample's kernel call chain (the
# first pattern any of its frames matches): this kernel's system calls enter through
# x64_sys_call, so the chain's functions tell them apart, not a __x64_sys_* frame.
_KERNEL = [("fdatasync (writeback, journal, block I/O)", r"ext4_sync_file|file_write_and_wait|jbd2|sys_fdatasync|sys_fsync"),
           ("write, writev, pwrite (page cache copy: segment, tail, audit line)",
            r"ext4_file_write_iter|ext4_buffered_write|generic_perform_write|vfs_write|sys_write|sys_pwrite|copy_file_range"),
           ("recv (TCP receive, copy out)", r"tcp_recvmsg|sock_recvmsg|sys_recvfrom|sys_read$"),
           ("send (TCP send, loopback delivery)", r"tcp_sendmsg|sock_sendmsg|sys_sendto"),
           ("futex (GIL and lock hand-offs)", r"futex"),
           ("page faults", r"page_fault"),
           ("scheduling (context switches)", r"schedule|finish_task_switch|switch_mm|__switch_to"),
           ("interrupts", r"irq|interrupt|apic"),
           ("other kernel work", r".")]


def kernel_split(perf_data: Path, pids: set[int]) -> tuple[dict[str, int], collections.Counter]:
    """Kernel samples of `pids` by what they were spent in (perf script's call chains),
    and by the boundary frame itself (which system call)."""
    out = subprocess.run(["perf", "script", "-i", str(perf_data), "-F", "pid,ip,sym"],
                         capture_output=True, text=True, errors="replace").stdout
    split: collections.Counter = collections.Counter()
    entries: collections.Counter = collections.Counter()
    for block in out.split("\n\n"):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if not lines or not lines[0].isdigit() or int(lines[0]) not in pids:
            continue
        kernel = []  # the chain's kernel frames, leaf first, up to the user/kernel boundary
        for ln in lines[1:]:
            ip, _, sym = ln.partition(" ")
            if not ip.startswith("ffff"):
                break
            kernel.append(sym)
        if not kernel:
            continue
        for name, pattern in _KERNEL:
            rule = re.compile(pattern)
            if any(rule.search(f) for f in kernel):
                split[name] += 1
                if name == _KERNEL[-1][0]:
                    entries[kernel[0]] += 1
                break
    return dict(split), entries


def tree_times(root: psutil.Process) -> dict[int, tuple[float, float]]:
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user + t.children_user, t.system + t.children_system)
        except psutil.Error:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stowage.bench.harness.store_profile",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="small")
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--perf", action="store_true", help="also split system time with perf record -g")
    ap.add_argument("--out", type=Path, help="keep the raw stacks (and perf.data) here")
    ap.add_argument("--stowage-workers", type=int)
    ap.add_argument("--report", type=Path, nargs="+", metavar="DIR", help="report runs kept with --out, pooled")
    args = ap.parse_args(argv)
    if args.report:
        return pooled(args.report)
    args.nagle, args.keep, args.tmp, args.send_timeout = False, False, None, 1800.0
    tools = ingest.sender_tools()
    if tools is None or not shutil.which("py-spy"):
        print("needs DCMTK storescu/echoscu and py-spy", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="stowage-profile-"))
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    proc = mon = None
    try:
        files = sorted(args.corpus.glob("*.dcm")) if args.corpus else generate(work / args.kind, args.kind, args.count)
        (work / "data").mkdir()
        (work / "logs").mkdir()
        rcv = RECEIVERS["stowage"]
        port = free_port()
        env = ingest.tool_env(False)
        proc, mon = ingest._start(rcv, rcv.build(port, work / "data", args.stowage_workers), port, work / "logs",
                                  tools["echoscu"], 60.0, env)
        mon.settle()
        root = psutil.Process(proc.pid)
        # py-spy at the default priority, even when this runs under nice: a starved sampler
        # takes few samples of a loaded machine (it only reads; its CPU is not the receiver's).
        spy = subprocess.Popen(["nice", "-n", str(-os.nice(0)), "py-spy", "record", "--pid", str(proc.pid), "--subprocesses", "--native",
                                "--rate", str(args.rate), "--format", "raw", "--output", str(out / "stacks.txt")],
                               stdout=subprocess.DEVNULL, stderr=open(out / "py-spy.err", "wb"))
        perf = None
        if args.perf:
            pids = ",".join(str(p) for p in tree_times(root))
            perf = subprocess.Popen(["perf", "record", "-g", "-F", "499", "-p", pids, "-o", str(out / "perf.data")],
                                    stdout=subprocess.DEVNULL, stderr=open(out / "perf.err", "wb"))
        time.sleep(1.0)  # both attached
        before, load0 = tree_times(root), os.getloadavg()[0]
        wall, errors, _ = ingest._send_storescu(port, rcv.aet, files, args.associations, tools, work,
                                                work / "logs", env, args)
        after, load1 = tree_times(root), os.getloadavg()[0]
        for p in (spy, perf):
            if p is not None:
                p.send_signal(signal.SIGINT)
                p.wait(120)
        if errors:
            print("send errors: " + "; ".join(errors), file=sys.stderr)
        run = {"instances": len(files), "user_s": sum(after[p][0] - before.get(p, (0, 0))[0] for p in after),
               "system_s": sum(after[p][1] - before.get(p, (0, 0))[1] for p in after), "wall_s": wall,
               "load": [load0, load1], "pids": sorted(after)}
        (out / "run.json").write_text(json.dumps(run))
        pooled([out])
    finally:
        if proc is not None:
            if mon is not None:
                mon.stop()
            stop_tree(proc, mon)
        shutil.rmtree(work, ignore_errors=True)  # the archive and logs; --out keeps the stacks apart
    return 0


def pooled(dirs: list[Path]) -> int:
    """Report the runs kept in `dirs` (each with run.json, stacks.txt, perf.data if --perf) as one."""
    stacks: collections.Counter = collections.Counter()
    split: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    n = user = system = wall = 0.0
    loads: list[float] = []
    have_perf = True
    for d in dirs:
        run = json.loads((d / "run.json").read_text())
        n, user, system, wall = n + run["instances"], user + run["user_s"], system + run["system_s"], wall + run["wall_s"]
        loads += run["load"]
        stacks.update(read_raw(d / "stacks.txt"))
        if (d / "perf.data").exists():
            k, e = kernel_split(d / "perf.data", set(run["pids"]))
            split.update(k)
            leaves.update(e)
        else:
            have_perf = False
    report(stacks, int(n), user, system, wall, (min(loads), max(loads)),
           (dict(split), leaves) if have_perf else None)
    return 0


# A sample whose innermost frame is a system call's libc wrapper is a thread in the kernel
# (or waiting there: py-spy's idle filter does not see a thread blocked in recv, a lock or
# fdatasync as idle when it unwinds native stacks); the kernel's side is perf's to split.
_IN_KERNEL = re.compile(r"^(__)?(libc_)?(recv\w*|send\w*|writev|write|read|pread64|pwrite64|fdatasync|fsync|"
                        r"clock_nanosleep|nanosleep|poll|ppoll|epoll_wait|select|accept4?|futex\w*|"
                        r"\w*futex_\w*wait\w*|sem_\w*wait\w*|pthread_cond_\w*wait\w*|do_futex_wait\w*|"
                        r"__lll_lock_wait\w*|openat|close|fstat|statx|stat|newfstatat|lseek|madvise|mmap|munmap|"
                        r"setsockopt|copy_file_range|posix_fadvise|fadvise64|getdents64|unlink|rename) ")


# ...and these: the heap growing, stat, futex wakes (a GIL or lock handed over), and libc
# frames py-spy could not name, which in these profiles are the system call instruction.
_ALSO_KERNEL = ("mprotect ", "brk ", "sbrk ", "fstatat64 ", "pthread_cond_signal ", "pthread_cond_broadcast ",
                "sem_post ", "0x")
_WAITING = re.compile(r"^(PyThread_acquire_lock_timed|take_gil|drop_gil|PyCOND_\w+) ")


def in_kernel(stack: tuple[str, ...]) -> bool:
    """Whether a sample is a thread in a system call or waiting for a lock or the GIL."""
    if not stack:
        return False
    leaf = stack[-1]
    if "libc.so" in leaf and (_IN_KERNEL.match(leaf) or leaf.startswith(_ALSO_KERNEL)):
        return True
    return any(_WAITING.match(f) for f in stack[-4:])


def report(stacks: collections.Counter, n: int, user: float, system: float, wall: float,
           load: tuple[float, float], kernel: tuple[dict[str, int], collections.Counter] | None) -> None:
    by: collections.Counter = collections.Counter()
    owners: dict[str, str] = {}
    unclassified: collections.Counter = collections.Counter()
    waiting = 0
    for stack, count in stacks.items():
        if in_kernel(stack):
            waiting += count
            continue
        name, owner = classify(list(stack))
        by[name] += count
        owners[name] = owner
        if name == OTHER[0]:
            unclassified[";".join(stack[-3:])] += count
    total = sum(by.values()) or 1
    us_user, us_sys = user / n * 1e6, system / n * 1e6
    print(f"{n} instances in {wall:.1f} s, load average {load[0]:.1f}-{load[1]:.1f}; receiver CPU "
          f"{us_user + us_sys:.0f} µs per instance: user {us_user:.0f}, system {us_sys:.0f}")
    print(f"py-spy: {total} samples in user space (a stage's user µs = its share x {us_user:.0f}); "
          f"{waiting} more in system calls or waiting, left to perf\n")
    print("| stage (user space) | whose | share | µs per instance |\n|---|---|---:|---:|")
    for name, count in by.most_common():
        print(f"| {name} | {owners[name]} | {count / total:.1%} | {count / total * us_user:.0f} |")
    if kernel:
        split, entries = kernel
        ktotal = sum(split.values()) or 1
        print(f"\nSystem time ({us_sys:.0f} µs per instance) by what the kernel did (perf, {ktotal} samples):\n\n"
              "| kernel | share | µs per instance |\n|---|---:|---:|")
        for name, count in sorted(split.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {count / ktotal:.1%} | {count / ktotal * us_sys:.0f} |")
        print("\nother kernel work, by leaf: " + ", ".join(f"{e} {c / ktotal:.1%}" for e, c in entries.most_common(8)))
    print("\nlargest unclassified user-space stacks (leaf end):")
    for stack, count in unclassified.most_common(8):
        print(f"  {count / total:.1%}  {stack[-200:]}")


if __name__ == "__main__":
    sys.exit(main())
