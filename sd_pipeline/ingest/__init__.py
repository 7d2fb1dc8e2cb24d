"""Ingestion: sources of captioned images into immutable, versioned webdataset shards."""
