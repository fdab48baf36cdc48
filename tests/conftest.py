"""Shared test set-up: make tests/ importable (reference_oracle) and print what is skipped."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
