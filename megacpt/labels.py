"""Label conventions shared by the data, training and evaluation code."""

# The label of positions that carry no loss (padding, prompts, document boundaries): torch's
# cross-entropy default ignore_index, which the fused loss kernels take as their default too.
IGNORE = -100
