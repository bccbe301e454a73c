"""Tiny (or, with --full, full-size) random models for every mode, in the real repos' layout: lib/testkit/models.py."""

from lib.testkit.models import main

if __name__ == "__main__":
    main()
