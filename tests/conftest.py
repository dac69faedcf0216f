import os
import sys

# make the bundle's `scripts` package importable from tests run at the repo root
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle"))
