"""The run store: ``s3://`` or a local folder behind one interface, untrusted keys contained, bounded retries."""
