"""Imported at start-up by any Python whose PYTHONPATH starts with this folder (the tests
put it there for a documented command): with MESHCHOP_TEST_MEMO set, recorded MeshNet
passes are replayed (see tests/network_memo.py).

Nothing is imported before napari_meshchop's inference module is: the same environment
also runs `python3 -m venv` and pip, before napari_meshchop is even installed.
"""

import importlib.abc
import importlib.machinery
import os
import sys

TARGET = "napari_meshchop.network.inference"


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            sys.meta_path.remove(self)
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            import network_memo

            network_memo.install(os.environ["MESHCHOP_TEST_MEMO"])

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("MESHCHOP_TEST_MEMO"):
    sys.meta_path.insert(0, _AfterImport())
