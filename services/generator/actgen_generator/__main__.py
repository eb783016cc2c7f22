"""``python -m actgen_generator ...``: the same as the ``actgen-generator`` command."""

from actgen_generator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
