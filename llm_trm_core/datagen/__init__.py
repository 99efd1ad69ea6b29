"""Stage 2 data: thinking generation, span bookkeeping, consistent (pre, post) hidden states."""
