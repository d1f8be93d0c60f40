"""lm-evaluation-harness on vbatch: importing this package registers lm-eval's model "vbatch".

    import vbatch.eval, lm_eval
    lm_eval.simple_evaluate(model="vbatch", model_args="pretrained=smollm2,dtype=float32",
                            tasks=["arc_easy"])

From the shell: `vbatch eval --model M [engine flags] --tasks T [lm-eval flags]`, or
`python -m vbatch.eval ...` which is lm-eval's own command line with "vbatch" registered
(lm-eval 0.4 finds models only in its own table, so `lm_eval --model vbatch` cannot work
without this import). Needs `pip install 'vbatch[eval]'`.
"""
from vbatch.eval.lm import VBatchLM

__all__ = ["VBatchLM"]
