"""What runs inside a worker process: association handling and one thin DIMSE handler
per service, calling into the archive API underneath."""
