"""The reduce methods an MSA checkpoint may name (msa-spec §3), in a module of their own so
that the command line can offer them without importing transformers."""

HEAD_REDUCE_METHODS: tuple[str, ...] = ("mean", "max")
QUERY_REDUCE_METHODS: tuple[str, ...] = ("max", "mean", "last")
CHUNK_REDUCE_METHODS: tuple[str, ...] = ("max", "mean")
