"""Check what the sdist and the wheel in DIR ship: the package, its C source, py.typed and the metadata."""

import sys
import tarfile
import zipfile
from pathlib import Path

dist = Path(sys.argv[1])
(wheel,) = dist.glob("*.whl")
(sdist,) = dist.glob("*.tar.gz")
with zipfile.ZipFile(wheel) as zf:
    in_wheel = set(zf.namelist())
with tarfile.open(sdist) as tf:
    in_sdist = {name.split("/", 1)[1] for name in tf.getnames() if "/" in name}
need_wheel = ["cdgrad/__init__.py", "cdgrad/py.typed", "cdgrad/_native/kernels.c", "cdgrad/experiments/cli.py"]
need_sdist = ["pyproject.toml", "README.md", *("src/" + n for n in need_wheel)]
missing = [f"wheel: {n}" for n in need_wheel if n not in in_wheel]
missing += [f"sdist: {n}" for n in need_sdist if n not in in_sdist]
if not any(n.endswith("entry_points.txt") for n in in_wheel):
    missing.append("wheel: the cdgrad console script (entry_points.txt)")
if missing:
    sys.exit("missing from the distributions: " + ", ".join(missing))
print(f"{wheel.name}: {len(in_wheel)} files; {sdist.name}: {len(in_sdist)} files; package, C source, py.typed ok")
