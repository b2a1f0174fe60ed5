"""Synthetic data in the Taobao data set's published format, with a planted, known truth."""
