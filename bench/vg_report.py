#!/usr/bin/python3
"""
bench/vg_report.py -- summarize valgrind memcheck logs of a PostgreSQL
cluster run under valgrind (bench/leakcheck.sh).

    /usr/bin/python3 bench/vg_report.py VGDIR PIDS_FILE WORKER_PID[,PID...] POSTMASTER_PID SRCDIR

VGDIR holds one <pid>.log per process; PIDS_FILE has "pid backend_type"
lines.  Prints the LEAK SUMMARY of every process, then, for the xcapi
worker, the loss records that the postmaster does not also have (those are
made before the fork and inherited by every child), marking records with a
frame in xcapi's sources, libcurl, libssl or libcrypto; and the first
memcheck errors of the worker.
"""

import glob
import os
import re
import sys

KINDS = ("definitely lost", "indirectly lost", "possibly lost", "still reachable")
ERR_RE = (r"^(Invalid [^\n]+|Conditional jump[^\n]+|Use of uninitialised[^\n]+|"
          r"Syscall param[^\n]+|Mismatched[^\n]+)\n((?:\s+(?:at|by) [^\n]+\n){1,8})")


def num(s):
    return int(s.replace(",", ""))


def fmt(v):
    return "-" if v is None else "{:,}".format(v)


def parse(path):
    raw = open(path, errors="replace").read()
    text = "\n".join(re.sub(r"^==\d+== ?", "", l) for l in raw.splitlines())
    kinds = {}
    for k in KINDS:
        m = re.search(r"^\s+%s: ([\d,]+) bytes in ([\d,]+) blocks" % k, text, re.M)
        kinds[k] = num(m.group(1)) if m else None
    if "All heap blocks were freed" in text:
        kinds = {k: 0 for k in KINDS}
    m = re.search(r"ERROR SUMMARY: ([\d,]+) errors", text)
    errs = num(m.group(1)) if m else None
    heap = re.search(r"total heap usage: ([\d,]+) allocs", text)
    records = []
    for block in re.split(r"\n\s*\n", text):
        m = re.search(r"^(.*?) are (definitely|indirectly|possibly) lost in loss record",
                      block, re.M)
        if not m:
            continue
        lines = block.strip().splitlines()
        frames = tuple(re.sub(r"^\s*(at|by) 0x[0-9A-F]+: ", "", l).strip() for l in lines[1:])
        sig = (m.group(2), re.sub(r" in loss record.*", "", lines[0]),
               tuple(re.sub(r"\(in [^)]*\)|\?\?\?", "", f) for f in frames))
        records.append((sig, lines))
    return {"kinds": kinds, "errs": errs, "mallocs": heap.group(1) if heap else "-",
            "records": records, "text": text}


def main():
    vgdir, pidfile, wpids, pm_pid, srcdir = sys.argv[1:6]
    wpids = list(dict.fromkeys(p for p in wpids.split(",") if p))
    types = {}
    for line in open(pidfile):
        p = line.split()
        if len(p) == 2:
            types[p[0]] = p[1]
    for p in wpids:
        types[p] = "xcapi_worker"
    types[pm_pid] = "postmaster"
    ours = [os.path.basename(f) for f in glob.glob(os.path.join(srcdir, "*.c"))]
    interesting = re.compile(r"xcapi\.so|libcurl|libssl|libcrypto|libnghttp|\((%s):\d+\)"
                             % "|".join(re.escape(f) for f in ours))

    logs = {os.path.basename(p)[:-4]: p for p in glob.glob(os.path.join(vgdir, "*.log"))}
    parsed = {pid: parse(p) for pid, p in logs.items()}
    parsed = {pid: r for pid, r in parsed.items()
              if any(v is not None for v in r["kinds"].values())}

    print("%-36s %12s %12s %12s %16s %7s %10s" % (
        "process (pid)", "definitely", "indirectly", "possibly", "still reachable",
        "errors", "mallocs"))

    def show(label, r):
        k = r["kinds"]
        print("%-36s %12s %12s %12s %16s %7s %10s" % (
            label, fmt(k["definitely lost"]), fmt(k["indirectly lost"]),
            fmt(k["possibly lost"]), fmt(k["still reachable"]), fmt(r["errs"]), r["mallocs"]))

    order = sorted(parsed, key=lambda p: (types.get(p) != "xcapi_worker",
                                          types.get(p) != "postmaster", types.get(p, "~"), p))
    for pid in order:
        t = types.get(pid)
        if t and t != "client_backend":
            show("%s (%s)" % (t, pid), parsed[pid])
    others = [parsed[p] for p in parsed if types.get(p, "client_backend") == "client_backend"]
    if others:
        def rng(key):
            vals = [o["kinds"][key] for o in others if o["kinds"][key] is not None]
            if not vals:
                return "-"
            lo, hi = min(vals), max(vals)
            return "{:,}".format(lo) if lo == hi else "{:,}..{:,}".format(lo, hi)
        errs = sorted(o["errs"] for o in others if o["errs"] is not None)
        print("%-36s %12s %12s %12s %16s %7s" % (
            "client backends (%d, psql)" % len(others), rng("definitely lost"),
            rng("indirectly lost"), rng("possibly lost"), rng("still reachable"),
            "-" if not errs else (fmt(errs[0]) if errs[0] == errs[-1]
                                  else "%s..%s" % (fmt(errs[0]), fmt(errs[-1])))))

    pm = parsed.get(pm_pid)
    pm_sigs = {sig for sig, _ in pm["records"]} if pm else set()
    pm_errs = set(h for h, _ in re.findall(ERR_RE, pm["text"], re.M)) if pm else set()
    for pid in wpids:
        r = parsed.get(pid)
        print("\n== xcapi worker (pid %s): loss records ==" % pid)
        if r is None:
            print("  no leak report in %s" % logs.get(pid, "(no log)"))
            continue
        inherited = [x for x in r["records"] if x[0] in pm_sigs]
        own = [x for x in r["records"] if x[0] not in pm_sigs]
        print("  %d record(s) identical in the postmaster's report (allocated before the fork:"
              " PostgreSQL start-up)" % len(inherited))
        print("  %d record(s) only in the worker%s" % (len(own), ":" if own else ""))
        for _, lines in own:
            mark = "   <-- xcapi/curl/openssl frame" if interesting.search("\n".join(lines)) else ""
            print("    " + lines[0] + mark)
            for l in lines[1:18]:
                print("        " + l.strip())
        k = r["kinds"]
        print("  worker LEAK SUMMARY: definitely %s, indirectly %s, possibly %s,"
              " still reachable %s bytes" % tuple(fmt(k[x]) for x in KINDS))
        if pm:
            print("  worker minus postmaster: definitely %+d, indirectly %+d, possibly %+d bytes"
                  % tuple((k[x] or 0) - (pm["kinds"][x] or 0) for x in KINDS[:3]))
        errs = re.findall(ERR_RE, r["text"], re.M)
        new_errs = [(h, s) for h, s in errs if h not in pm_errs]
        print("  memcheck errors in the worker: %s in all (postmaster: %s); contexts the postmaster"
              " does not have: %d" % (fmt(r["errs"]), fmt(pm["errs"]) if pm else "-", len(new_errs)))
        for head, stack in new_errs[:5]:
            mark = "   <-- xcapi/curl/openssl frame" if interesting.search(stack) else ""
            print("    " + head + mark)
            for l in stack.splitlines()[:8]:
                print("        " + l.strip())
        print("  log: %s" % logs[pid])

    # the backends run xcapi_fire and the trigger's batched writes
    if others and pm:
        own = {}
        for o in others:
            for head, stack in re.findall(ERR_RE, o["text"], re.M):
                if head not in pm_errs:
                    own.setdefault(head, stack)
        print("\n== client backends: memcheck errors the postmaster does not have: %d ==" % len(own))
        for head, stack in list(own.items())[:5]:
            mark = "   <-- xcapi/curl/openssl frame" if interesting.search(stack) else ""
            print("    " + head + mark)
            for l in stack.splitlines()[:8]:
                print("        " + l.strip())


if __name__ == "__main__":
    main()
