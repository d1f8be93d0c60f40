"""`python -m vbatch.eval ARGS`: lm-eval's own command line, with the "vbatch" model registered."""
from lm_eval.__main__ import cli_evaluate

import vbatch.eval  # noqa: F401 - registers lm-eval's "vbatch" model

if __name__ == "__main__":
    cli_evaluate()
