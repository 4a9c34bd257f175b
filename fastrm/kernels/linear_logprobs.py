"""Plain reference of ``linear_logprobs``: the eager LM-head + log-softmax + gather most RLHF code runs.

The fused op itself has no kernel of its own: it runs cuBLAS/ATen matmuls on token chunks and the
``gather_logprobs`` kernels (``fastrm.kernels.logprobs``) on each chunk of logits.
"""


from fastrm.kernels.logprobs import gather_logprobs_reference


def linear_logprobs_reference(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100,
                              return_entropy=False, softcap=None):
    """``log_softmax((hidden @ weight.T + bias) / temperature)[..., labels]`` the eager way.

    Builds the whole ``[..., V]`` logits in the inputs' dtype (as ``lm_head(hidden)`` does), then the
    float32 (float64 for float64 inputs) log-softmax over it: the baseline the benchmarks compare
    against and, with float64 inputs, the ground truth of the tests.
    """
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return gather_logprobs_reference(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                     return_entropy=return_entropy, softcap=softcap)
