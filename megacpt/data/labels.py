"""Label values shared by the data layer, the trainer and evaluation."""

# The label of positions that carry no loss (prompt tokens, padding, document boundaries):
# torch's cross-entropy skips it by default (ignore_index=-100).
IGNORE = -100
