"""Retrieval-augmented generation (LBDL 8.1): chunking, a BM25 / dense / hybrid index, retrieval, prompt assembly.

    lbdl rag index docs/ --out docs.rag --model run/best      # chunks, BM25, embeddings
    lbdl rag query docs.rag "how do I merge adapters?" --answer-with run/best

Modules: chunk (files into chunks), lexical (BM25 through bm25s), embed (dense embeddings of a model), index
(the index directory, built and updated), retrieve (search, reciprocal-rank fusion), assemble (the prompt with
its sources, an answer). Nothing is imported here, so that `import lbdl_cli.rag.chunk` costs no torch.
"""
