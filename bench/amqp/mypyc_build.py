"""A copy of this checkout with its queue-path hot modules compiled by mypyc (issue 17).

Run: ``python bench/amqp/mypyc_build.py DEST [--modules path.py,...]`` (a plain script),
then compare the copy with the pure-Python checkout on the same suite:
``python bench/amqp/ab.py --sources .,DEST``. Exports ``HEAD`` (``git archive``) into
``DEST``, compiles the named modules there with the venv's mypyc (mypy is pinned in
constraints.txt; needs a C compiler and Python's headers) and removes their ``.py``
files, so the copy can only import the extension modules. Prints the build time and
each module's file. Nothing in this checkout changes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# the queue paths' modules holding the per-message Python in the profiles (bench/README.md,
# "Fifth pass (mypyc)"): the record codec, the AMQP frames, machines and channel, the
# shared-group window with its settle and save paths, receipts and the HTTP framing. They
# compile and import as written since that pass; what mypyc needed: no ``object``
# annotation on a dataclass field, no Generic ``@dataclass(slots=True)``, no
# ``object.__new__`` of a native class (record_batch checks ``_COMPILED``), and every
# class of a chain compiled (SharedWindows -> SharedQueues -> SharedGroups: an interpreted
# class cannot inherit from a compiled one). Left out: protocols/http/codec.py (its error
# classes' ``code`` overrides read as the base class's when compiled) and the HTTP
# handlers: protocols/http/shared_handlers.py, handlers.py and schemas.py compile and
# import together only (``--modules`` with them: the README's HTTP build). Six tests of
# tests/broker/test_shared_wakeups.py fail on a compiled copy: they monkeypatch methods
# of a SharedGroups instance, which a native class does not allow
MODULES = ("conveyor/storage/record_batch.py", "conveyor/protocols/amqp/frames.py",
           "conveyor/protocols/amqp/machine.py", "conveyor/protocols/amqp/channel_machine.py",
           "conveyor/protocols/amqp/channel.py", "conveyor/protocols/amqp/messages.py",
           "conveyor/protocols/amqp/basic_handlers.py", "conveyor/protocols/amqp/session.py",
           "conveyor/broker/shared_group.py", "conveyor/broker/shared_windows.py",
           "conveyor/broker/shared_queues.py", "conveyor/broker/shared_groups.py",
           "conveyor/broker/shared_model.py", "conveyor/broker/shared_persist.py",
           "conveyor/broker/delivery.py", "conveyor/broker/appended_cache.py",
           "conveyor/protocols/http/receipts.py", "conveyor/protocols/http/framing.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--modules", default=",".join(MODULES))
    options = parser.parse_args()
    root = Path(__file__).resolve().parents[2]
    dest = options.dest.resolve()
    dest.mkdir(parents=True, exist_ok=False)
    archive = subprocess.run(["git", "-C", str(root), "archive", "HEAD"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    modules = options.modules.split(",")
    mypyc = Path(sys.executable).with_name("mypyc")
    started = time.monotonic()
    # the copy's pyproject.toml would make setuptools (which mypyc's build runs in the
    # same directory) refuse a flat layout with two packages: set it aside meanwhile
    project = dest / "pyproject.toml"
    project.rename(dest / "pyproject.toml.aside")
    try:
        subprocess.run([str(mypyc), "--ignore-missing-imports", *modules], cwd=dest,
                       check=True, stdout=subprocess.DEVNULL)
    finally:
        (dest / "pyproject.toml.aside").rename(project)
    build_s = time.monotonic() - started
    for module in modules:
        (dest / module).unlink()  # only the extension module can be imported now
    names = [module.removesuffix(".py").replace("/", ".") for module in modules]
    found = subprocess.run(
        [sys.executable, "-c", "import importlib, json, sys; print(json.dumps("
         "[importlib.import_module(n).__file__ for n in sys.argv[1:]]))", *names],
        cwd=dest, env={"PYTHONPATH": str(dest)}, check=True, capture_output=True,
        text=True).stdout
    files = json.loads(found)
    assert all(str(file).endswith(".so") for file in files), files
    print(json.dumps({"dest": str(dest), "build_s": round(build_s, 1), "modules": files}))


if __name__ == "__main__":
    main()
