"""placeholder"""
def vocab_parallel_linear_cross_entropy(*a, **k):
    raise NotImplementedError
