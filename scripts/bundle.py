#!/usr/bin/env python3
"""Copies the executables cargo built (its --message-format=json on stdin)
whose target names are given into a folder: the GPU check's bundle.

    cargo build ... --message-format=json | python3 scripts/bundle.py DIR NAME...
"""
import json
import shutil
import sys

folder, names = sys.argv[1], set(sys.argv[2:])
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in names:
        shutil.copy(m["executable"], f"{folder}/{m['target']['name']}")
        print("bundled", m["target"]["name"])
