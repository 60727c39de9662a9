"""``python -m index ...`` is the same as ``python -m index.build ...``."""
from index.build import main

if __name__ == "__main__":
    raise SystemExit(main())
