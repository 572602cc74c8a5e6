#!/usr/bin/env python3
"""Reads what libpcsamp.so wrote (samples.tsv, cubin_<crc>.cubin) and reports stall reasons.

  pcsamp-report.py DIR                      per-function summary (samples, share, top stall reasons)
  pcsamp-report.py DIR FUNC                 SASS of the function (substring match) with, per instruction,
                                            its samples, share of the function and top stall reasons
  pcsamp-report.py DIR FUNC --hot 0.5       only instructions with >= 0.5% of the function (+ context)
  pcsamp-report.py DIR FUNC --by-line       per source line (needs line info in the cubin)
  pcsamp-report.py DIR FUNC --top 30        the 30 hottest instructions, sorted

The SASS comes from nvdisasm (build.sh fetches it into /tmp/pcsamp-tools; or pass --nvdisasm, or set
NVDISASM). Plain Python 3, no third-party packages.
"""
import argparse
import collections
import glob
import os
import re
import shutil
import signal
import subprocess
import sys

NOT_ISSUED = "_not_issued"
PREFIXES = ("smsp__pcsamp_warps_issue_stalled_", "smsp__pcsamp_")


def short(name):
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def is_not_issued(name):
    return name.endswith(NOT_ISSUED)


class Samples:
    """samples.tsv: crc, function, pcOffset, total, one column per stall reason."""

    def __init__(self, path):
        self.path = path
        with open(path) as f:
            header = f.readline().rstrip("\n").split("\t")
            if header[:4] != ["crc", "function", "pcOffset", "total"]:
                sys.exit(f"{path}: unexpected header {header[:4]}")
            self.columns = header[4:]
            self.rows = []  # (crc, func, pc, total, counts)
            for ln, line in enumerate(f, 2):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 4 + len(self.columns):
                    print(f"warning: {path}:{ln}: {len(parts)} fields, expected {4 + len(self.columns)}",
                          file=sys.stderr)
                    continue
                crc, func, pc, total = parts[0], parts[1], int(parts[2], 0), int(parts[3])
                counts = [int(x) for x in parts[4:]]
                self.rows.append((crc, func, pc, total, counts))
        anynot = any(is_not_issued(c) for c in self.columns)
        anyall = any(not is_not_issued(c) for c in self.columns)
        # "total" = the all-samples reasons; the _not_issued ones are a subset view (see README)
        self.in_total = [(not is_not_issued(c)) if (anynot and anyall) else True for c in self.columns]

    def subset_violations(self):
        """(pc, reason) pairs where X_not_issued > X: would mean the two families are disjoint."""
        idx = {c: i for i, c in enumerate(self.columns)}
        pairs = [(i, idx.get(c[: -len(NOT_ISSUED)])) for i, c in enumerate(self.columns) if is_not_issued(c)]
        bad = 0
        for *_, counts in self.rows:
            for ni, base in pairs:
                if counts[ni] and (base is None or counts[base] < counts[ni]):
                    bad += 1
        return bad


def demangler():
    cxxfilt = shutil.which("c++filt")
    cache = {}

    def dm(name):
        if not cxxfilt or not name.startswith("_Z"):
            return name
        if name not in cache:
            try:
                cache[name] = subprocess.run([cxxfilt, name], capture_output=True, text=True,
                                             timeout=10).stdout.strip() or name
            except Exception:
                cache[name] = name
        return cache[name]

    return dm


def find_nvdisasm(arg):
    for cand in (arg, os.environ.get("NVDISASM"), "/tmp/pcsamp-tools/nvdisasm-bin",
                 "/tmp/pcsamp-tools/nvdisasm/x/nvidia/cu13/bin/nvdisasm", shutil.which("nvdisasm")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def find_cubin(d, crc):
    for base in (d, os.path.dirname(os.path.abspath(d))):
        p = os.path.join(base, f"cubin_{crc}.cubin")
        if os.path.isfile(p):
            return p
    return None


INS_RE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s*(.*?)\s*(?:/\*\s*0x[0-9a-fA-F]+\s*\*/)?\s*$")
SEC_RE = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
LBL_RE = re.compile(r"^(\.L\w+|[A-Za-z_$][\w$.]*):\s*$")
LINE_RE = re.compile(r'^\s*//## File "(.*)", line (\d+)(.*)$')


def disassemble(cubin, nvdisasm, crc):
    """-> {function: [("ins", offset, text, (file, line) | None) | ("label", text) | ("line", file, line, extra)]}"""
    cache_dir = os.environ.get("PCSAMP_CACHE", "/tmp/pcsamp-report-cache")
    os.makedirs(cache_dir, exist_ok=True)
    st = os.stat(cubin)
    cache = os.path.join(cache_dir, f"{crc}_{st.st_size}.sass")
    if os.path.isfile(cache) and os.path.getsize(cache) > 0:
        text = open(cache).read()
    else:
        r = subprocess.run([nvdisasm, "-c", "-g", cubin], capture_output=True, text=True)
        if r.returncode != 0:
            # line info can trip it up; try once more without
            r = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"nvdisasm failed on {cubin}:\n{r.stderr[-2000:]}")
        text = r.stdout
        with open(cache, "w") as f:
            f.write(text)
    funcs = collections.OrderedDict()
    cur = None
    loc = None
    for line in text.splitlines():
        m = SEC_RE.match(line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            loc = None
            continue
        if cur is None:
            continue
        m = INS_RE.match(line)
        if m:
            funcs[cur].append(("ins", int(m.group(1), 16), m.group(2), loc))
            continue
        m = LINE_RE.match(line)
        if m:
            loc = (m.group(1), int(m.group(2)))
            funcs[cur].append(("line", m.group(1), int(m.group(2)), m.group(3).strip()))
            continue
        m = LBL_RE.match(line.strip())
        if m and m.group(1).startswith(".L"):
            funcs[cur].append(("label", m.group(1)))
    return funcs


def pct(a, b):
    return 100.0 * a / b if b else 0.0


def reasons_text(counts, columns, mask, k, denom=None):
    items = [(c, i) for i, c in enumerate(counts) if c and mask[i]]
    items.sort(reverse=True)
    tot = denom if denom is not None else sum(c for c, _ in items)
    return " ".join(f"{short(columns[i])} {pct(c, tot):.0f}%" for c, i in items[:k])


def summary(s, dm, args):
    cols = s.columns
    by_fn = collections.OrderedDict()
    for crc, func, pc, total, counts in s.rows:
        e = by_fn.setdefault(func, [0, [0] * len(cols), set(), 0])
        e[0] += total
        e[1] = [a + b for a, b in zip(e[1], counts)]
        e[2].add(crc)
        e[3] += 1
    grand = sum(e[0] for e in by_fn.values())
    print(f"{s.path}: {len(s.rows)} PCs, {grand} samples, {len(by_fn)} functions, {len(cols)} stall reasons")
    print()
    print(f"{'samples':>10} {'share':>7} {'pcs':>6}  {'top stall reasons':<56} function")
    for func, (tot, counts, crcs, npcs) in sorted(by_fn.items(), key=lambda kv: -kv[1][0]):
        if args.min_share and pct(tot, grand) < args.min_share:
            continue
        rs = reasons_text(counts, cols, s.in_total, 3, tot)
        print(f"{tot:>10} {pct(tot, grand):>6.2f}% {npcs:>6}  {rs:<56} {dm(func)}")
    allc = [sum(r[4][i] for r in s.rows) for i in range(len(cols))]
    print("\nall functions, stall reasons (share of all samples):")
    for c, i in sorted(((c, i) for i, c in enumerate(allc) if c and s.in_total[i]), reverse=True):
        print(f"  {pct(c, grand):6.2f}%  {c:>10}  {short(cols[i])}")
    checks(s)


def checks(s):
    bad = s.subset_violations()
    if bad:
        print(f"\nNOTE: at {bad} (pc, reason) pairs X_not_issued > X: the _not_issued columns are not a subset of the"
              " all-samples ones here, so 'total' (which leaves them out) undercounts; see README.md", file=sys.stderr)
    d = os.path.dirname(s.path)
    missing = sorted({r[0] for r in s.rows if not find_cubin(d, r[0])})
    if missing:
        print(f"\nNOTE: no cubin for crc {', '.join(missing)} (its SASS cannot be shown)", file=sys.stderr)


def pick_function(s, pattern, dm):
    names = collections.Counter()
    for crc, func, pc, total, counts in s.rows:
        names[func] += total
    exact = [n for n in names if n == pattern or dm(n) == pattern]
    cands = exact or [n for n in names if pattern in n or pattern in dm(n)]
    if not cands:
        sys.exit(f"no function matching {pattern!r}; functions: " + ", ".join(dm(n) for n, _ in names.most_common(20)))
    cands.sort(key=lambda n: -names[n])
    if len(cands) > 1:
        print(f"{len(cands)} functions match {pattern!r}; showing the one with most samples "
              f"(use a longer pattern for another):", file=sys.stderr)
        for n in cands[:15]:
            print(f"  {names[n]:>10}  {dm(n)}", file=sys.stderr)
    return cands[0]


def annotate(s, func, dm, args):
    cols = s.columns
    mask = [not m for m in s.in_total] if args.not_issued else s.in_total
    nvdisasm = find_nvdisasm(args.nvdisasm)
    d = os.path.dirname(s.path)
    by_crc = collections.defaultdict(dict)
    for crc, f, pc, total, counts in s.rows:
        if f == func:
            val = sum(c for c, m in zip(counts, mask) if m) if args.not_issued else total
            by_crc[crc][pc] = (val, counts)
    for crc, pcs in sorted(by_crc.items(), key=lambda kv: -sum(v[0] for v in kv[1].values())):
        ftotal = sum(v[0] for v in pcs.values())
        fcounts = [sum(v[1][i] for v in pcs.values()) for i in range(len(cols))]
        print(f"== {dm(func)}")
        if dm(func) != func:
            print(f"   ({func})")
        what = "not-issued samples" if args.not_issued else "samples"
        print(f"   cubin {crc}: {ftotal} {what} at {len(pcs)} PCs")
        print("   stall reasons: " + reasons_text(fcounts, cols, mask, 8, ftotal))
        cubin = find_cubin(d, crc)
        listing = None
        if not cubin:
            print(f"   (no cubin_{crc}.cubin next to {s.path}: offsets only)")
        elif not nvdisasm:
            print("   (nvdisasm not found: run build.sh, pass --nvdisasm or set NVDISASM; offsets only)")
        else:
            funcs = disassemble(cubin, nvdisasm, crc)
            listing = funcs.get(func)
            if listing is None:
                print(f"   ({func} not found among the {len(funcs)} functions of {os.path.basename(cubin)})")
        print()
        if listing is None:
            listing = [("ins", pc, "", None) for pc in sorted(pcs)]
        ins_offsets = {e[1] for e in listing if e[0] == "ins"}
        orphans = {pc: v for pc, v in pcs.items() if pc not in ins_offsets}
        if args.by_line:
            by_line(listing, pcs, cols, mask, ftotal, args)
        elif args.top:
            top(listing, pcs, cols, mask, ftotal, args)
        else:
            full(listing, pcs, cols, mask, ftotal, args)
        if orphans:
            n = sum(v[0] for v in orphans.values())
            print(f"\nWARNING: {n} samples ({pct(n, ftotal):.1f}%) at {len(orphans)} offsets that are not instruction "
                  f"offsets of this function: {', '.join(hex(p) for p in sorted(orphans)[:10])}"
                  " (offset base mismatch or wrong cubin?)")
        print()


def bar(share):
    n = int(round(share / 5.0))
    return ("#" * min(n, 20)).ljust(6) if share > 0 else " " * 6


def full(listing, pcs, cols, mask, ftotal, args):
    width = args.width
    keep = None
    if args.hot is not None:
        hot_idx = [i for i, e in enumerate(listing)
                   if e[0] == "ins" and pct(pcs.get(e[1], (0,))[0], ftotal) >= args.hot]
        keep = set()
        for i in hot_idx:
            keep.update(range(max(0, i - args.context), min(len(listing), i + args.context + 1)))
    print(f"{'offset':>8} {'samples':>8} {'share':>6} {'':6}  {'instruction':<{width}}  top stall reasons")
    last = -2
    for i, e in enumerate(listing):
        if keep is not None and i not in keep:
            continue
        if keep is not None and i != last + 1 and last >= 0:
            print(f"{'...':>8}")
        last = i
        if e[0] == "label":
            print(f"{'':>8} {'':>8} {'':>6} {'':6}  {e[1]}:")
        elif e[0] == "line":
            if args.lines:
                print(f"{'':>8} {'':>8} {'':>6} {'':6}  // {e[1]}:{e[2]} {e[3]}".rstrip())
        else:
            off, text = e[1], e[2]
            v, counts = pcs.get(off, (0, None))
            share = pct(v, ftotal)
            rs = reasons_text(counts, cols, mask, args.reasons, v) if counts and v else ""
            sv = f"{v:>8}" if v else f"{'.':>8}"
            ss = f"{share:>5.1f}%" if v else f"{'':>6}"
            print(f"  {off:06x} {sv} {ss} {bar(share)}  {text:<{width}}  {rs}".rstrip())


def top(listing, pcs, cols, mask, ftotal, args):
    text_of = {e[1]: (e[2], e[3]) for e in listing if e[0] == "ins"}
    rows = sorted(pcs.items(), key=lambda kv: -kv[1][0])[: args.top]
    cum = 0
    print(f"{'offset':>8} {'samples':>8} {'share':>6} {'cum':>6}  {'instruction':<{args.width}}  top stall reasons")
    for off, (v, counts) in rows:
        cum += v
        text, loc = text_of.get(off, ("?", None))
        where = f"  [{os.path.basename(loc[0])}:{loc[1]}]" if loc and args.lines else ""
        print(f"  {off:06x} {v:>8} {pct(v, ftotal):>5.1f}% {pct(cum, ftotal):>5.1f}%  {text:<{args.width}}  "
              f"{reasons_text(counts, cols, mask, args.reasons, v)}{where}")


def by_line(listing, pcs, cols, mask, ftotal, args):
    agg = collections.OrderedDict()
    for e in listing:
        if e[0] != "ins":
            continue
        key = e[3] or ("<no line info>", 0)
        v, counts = pcs.get(e[1], (0, None))
        a = agg.setdefault(key, [0, [0] * len(cols), 0])
        a[2] += 1
        if v:
            a[0] += v
            a[1] = [x + y for x, y in zip(a[1], counts)]
    if list(agg) == [("<no line info>", 0)]:
        print("no line info in this cubin (for PTX modules the driver JIT drops it unless the program passes "
              "CU_JIT_GENERATE_LINE_INFO); use the SASS listing instead")
        return
    src_cache = {}

    def src(path, line):
        if path not in src_cache:
            try:
                src_cache[path] = open(path).read().splitlines()
            except OSError:
                src_cache[path] = None
        lines = src_cache[path]
        return lines[line - 1].strip() if lines and 0 < line <= len(lines) else ""

    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])
    if args.top:
        rows = rows[: args.top]
    print(f"{'samples':>8} {'share':>6} {'instrs':>6}  {'file:line':<34} {'top stall reasons':<48} source")
    for (path, line), (v, counts, n) in rows:
        if not v:
            continue
        rs = reasons_text(counts, cols, mask, 3, v)
        print(f"{v:>8} {pct(v, ftotal):>5.1f}% {n:>6}  {os.path.basename(path) + ':' + str(line):<34} {rs:<48} "
              f"{src(path, line)[:100]}")


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="the PCSAMP_OUT folder (with samples.tsv), or a samples.tsv")
    ap.add_argument("function", nargs="?", help="function to annotate (substring of its name)")
    ap.add_argument("--nvdisasm", help="path to nvdisasm")
    ap.add_argument("--hot", type=float, metavar="PCT", help="only instructions with at least PCT%% of the samples")
    ap.add_argument("--context", type=int, default=3, help="lines around hot instructions with --hot (3)")
    ap.add_argument("--top", type=int, metavar="N", help="the N hottest instructions (or lines with --by-line)")
    ap.add_argument("--by-line", action="store_true", help="aggregate by source line (needs line info)")
    ap.add_argument("--reasons", type=int, default=3, help="stall reasons per instruction (3)")
    ap.add_argument("--not-issued", action="store_true",
                    help="use the _not_issued stall reasons (samples where the warp issued nothing)")
    ap.add_argument("--lines", action="store_true", help="show source-line markers in the listing")
    ap.add_argument("--width", type=int, default=56, help="instruction column width (56)")
    ap.add_argument("--min-share", type=float, default=0.0, help="summary: hide functions below this share")
    args = ap.parse_args()
    path = args.dir
    if os.path.isdir(path):
        path = os.path.join(path, "samples.tsv")
        if not os.path.isfile(path):
            sub = sorted(glob.glob(os.path.join(args.dir, "pid*", "samples.tsv")))
            if sub:
                sys.exit(f"no samples.tsv in {args.dir}, but per-process ones: {', '.join(sub)}")
            sys.exit(f"no samples.tsv in {args.dir} (did the program exit normally? see pcsamp.log there)")
    s = Samples(path)
    dm = demangler()
    others = glob.glob(os.path.join(os.path.dirname(path), "pid*", "samples.tsv"))
    if others:
        print(f"note: other processes wrote {', '.join(others)}", file=sys.stderr)
    if not args.function:
        summary(s, dm, args)
    else:
        annotate(s, pick_function(s, args.function, dm), dm, args)


if __name__ == "__main__":
    main()
