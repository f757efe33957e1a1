"""Data preparation: a party's own table (CSV, TSV, Parquet) or raw Criteo text -> memory-mappable arrays, each
column encoded as its kind in the party's schema (`data_prep.schema`). Imports nothing of `vfl_cli`."""
