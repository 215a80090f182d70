"""python -m training_core.shards (interim)."""

from training_core.shards.write import main

if __name__ == "__main__":
    raise SystemExit(main())
