"""Data: ingestion with validation and quarantine, the offline demo corpus, chat rendering."""
