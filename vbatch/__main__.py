"""`python -m vbatch` runs the same Click group as the `vbatch` console script."""
from vbatch.jobs.cli import main

if __name__ == "__main__":
    main()
