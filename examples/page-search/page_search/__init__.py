"""page-search: index a folder of PDFs and page images through a colembed-3b deployment into an
embedded vector store, and search it (MUVERA FDE candidates, then exact MaxSim rerank)."""
