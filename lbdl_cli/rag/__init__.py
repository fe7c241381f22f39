"""Retrieval-augmented generation (LBDL 8.1): chunking, lexical/dense/hybrid indexes, retrieval, prompt assembly."""
