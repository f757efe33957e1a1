"""Data preparation: raw Criteo text -> per-party memory-mappable arrays."""
