"""The install lock: `constraints.txt` pins every distribution `make install` puts in `.venv`.

    python scripts/lock.py check          # pip freeze == the lock (markers evaluated here)? exit 1 if not
    python scripts/lock.py check --fix    # ... after uninstalling what the lock does not name
    python scripts/lock.py update         # re-resolve at the newest versions, show the changes, run make test
    python scripts/lock.py update --exclude-newer 2026-11-28T02:00:00Z --no-test

`pyproject.toml` keeps the ranges kdlib supports; `constraints.in` adds the pins the lock must keep
(the matched torch pair, the transformers the prose was measured with). `update` resolves both with
uv (`uv pip compile --universal`: one file for every platform and Python >= 3.10, with markers; uv
is installed into `build/lock-tools/`, not into the project's venv) and writes `constraints.txt`.
`make install` installs exactly that file with `--no-deps`, so a fresh machine gets what the last
green CI got, whatever the registry published since.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
INPUTS = ROOT / "constraints.in"
TOOLS = ROOT / "build" / "lock-tools"
# pip freeze leaves these out of its list (Python < 3.12 venvs ship them); the lock may pin them.
FREEZE_HIDES = {"pip", "setuptools", "wheel", "distribute"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*(?:;\s*(.+?))?\s*$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK, *, all_markers: bool = False) -> dict[str, str]:
    """{canonical name: version} of the lock's pins whose marker holds on this interpreter
    (every pin with `all_markers`, the last one of a name winning)."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        if not m:
            raise SystemExit(f"{path.name} line {number}: not a `name==version [; marker]` pin: {line!r}")
        name, version, marker = m.groups()
        if all_markers or marker is None or _holds(marker):
            pins[canonical(name)] = version
    return pins


def _holds(marker: str) -> bool:
    from packaging.markers import Marker  # in the venv (transformers needs it); `update` does not

    return Marker(marker).evaluate()


def frozen(python: str = sys.executable) -> dict[str, str]:
    """{canonical name: version} from `pip freeze --exclude-editable` of `python`'s environment."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    pins = {}
    for line in out.splitlines():
        m = PIN.match(line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
        elif line.strip() and not line.startswith("#"):
            # `name @ file://...` or similar: installed from somewhere the lock cannot pin
            pins[canonical(re.split(r"[ @=]", line.strip())[0])] = line.strip()
    return pins


def compare(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """Each way the environment differs from the lock, one line each (empty: they agree)."""
    problems = []
    for name in sorted(set(locked) | set(installed)):
        if name == "kdlib" or name in FREEZE_HIDES:
            continue
        want, have = locked.get(name), installed.get(name)
        if want is None:
            problems.append(f"{name}=={have} is installed but not in the lock")
        elif have is None:
            problems.append(f"{name}=={want} is in the lock but not installed")
        elif want != have:
            problems.append(f"{name}: the lock says {want}, installed {have}")
    return problems


def check(fix: bool) -> int:
    locked = read_lock()
    problems = compare(locked, frozen())
    extra = [p.split("==")[0] for p in problems if p.endswith("not in the lock")]
    if fix and extra:
        print(f"lock: uninstalling {len(extra)} distributions the lock does not name: {' '.join(extra)}")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *extra], check=True)
        problems = compare(locked, frozen())
    if problems:
        print(f"lock: the environment differs from {LOCK.name} in {len(problems)} ways:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print("  (make install reinstalls from the lock; delete .venv to start over)", file=sys.stderr)
        return 1
    print(f"lock: the environment equals {LOCK.name} ({len(locked)} pins for this platform)")
    return 0


def uv() -> str:
    exe = TOOLS / "bin" / "uv"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
        subprocess.run([str(TOOLS / "bin" / "python"), "-m", "pip", "install", "-q", "uv"], check=True)
    return str(exe)


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a != b:
            lines.append(f"  {name}: {a or '(new)'} -> {b or '(removed)'}")
    return lines


def update(exclude_newer: str | None, test: bool) -> int:
    old = read_lock(all_markers=True) if LOCK.exists() else {}
    cmd = [uv(), "pip", "compile", "pyproject.toml", "--extra", "all", "--universal",
           "--python-version", "3.10", "-c", INPUTS.name, "--no-emit-package", "kdlib",
           "--upgrade", "--quiet", "-o", LOCK.name]
    again = "python scripts/lock.py update"
    if exclude_newer:
        cmd += ["--exclude-newer", exclude_newer]
        again += f" --exclude-newer {exclude_newer}"
    cmd += ["--custom-compile-command", again]
    subprocess.run(cmd, check=True, cwd=ROOT)
    # Changes are reported for this platform's pins and for every marker's (last one per name).
    diff = changes(old, read_lock(all_markers=True))
    print(f"lock: {LOCK.name} rewritten; {len(diff)} distributions changed" + (":" if diff else ""))
    print("\n".join(diff))
    if not test:
        print("lock: tests not run (--no-test); run `make test` before committing the new lock")
        return 0
    # make install sees the new constraints.txt and reinstalls from it, then the whole suite runs.
    rc = subprocess.run(["make", "test"], cwd=ROOT).returncode
    print(f"lock: make test exited {rc}: " + ("commit constraints.txt" if rc == 0 else
          "the new versions break something; fix it or pin the culprit in constraints.in"))
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="does this environment equal the lock?")
    c.add_argument("--fix", action="store_true", help="uninstall what the lock does not name first")
    u = sub.add_parser("update", help="re-resolve the lock at the newest versions, then run make test")
    u.add_argument("--exclude-newer", metavar="DATE",
                   help="resolve as of this date (RFC 3339), e.g. to rebuild an earlier lock")
    u.add_argument("--no-test", action="store_true", help="only rewrite constraints.txt")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.fix)
    return update(args.exclude_newer, not args.no_test)


if __name__ == "__main__":
    sys.exit(main())
