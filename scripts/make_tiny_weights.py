"""Tiny (or, with --full, full-size) random models for every mode, in the real repos' layout: lib/testkit/tiny.py."""

from lib.testkit.tiny import main

if __name__ == "__main__":
    main()
