"""``weft lab``: the whole mesh on one Linux machine (nodes and pods as namespaces)."""
